"""The other backends (pure builders): DeepSpeed's own launcher, SLURM, and manual (no-ssh) mode.

The default backend (torchrun per host through a host agent, see job.py) is the only one with
deepfleet's supervision. These exist for sites that already standardise on another launcher.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from typing import Mapping

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.inventory import Fleet, render_hostfile
from deepfleet.launch.commands import torchrun_argv
from deepfleet.launch.job import LaunchPlan
from deepfleet.env_vars import is_secret, masked


@dataclass(frozen=True, kw_only=True)
class DeepSpeedLaunch:
    argv: list[str]
    env: dict[str, str]              # for the runner process on the head
    files: dict[str, str]            # path -> content, written before running
    withheld_secrets: list[str]      # never exported: DeepSpeed puts exports on the pdsh command line


# DeepSpeed's pdsh runner builds one remote shell line: it passes values matching its own
# `add_export` test unquoted, wraps other env values and arguments with spaces in double quotes
# (where the shell still expands $(...), backticks and "), and passes anything else, the working
# dir included, raw. So only these characters are let through; the rest are refused.
DEEPSPEED_RAW = re.compile(r"[\w@%+=:,./-]*")
DEEPSPEED_QUOTED = re.compile(r"[\w@%+=:,./ -]*")


def deepspeed_unsafe(*, env: Mapping[str, str], command: list[str], paths: Mapping[str, str]) -> list[Problem]:
    """Values DeepSpeed's launcher would hand to every host's shell in a form the shell reinterprets."""
    fix = "use the default backend, which quotes every value, or remove the characters"
    found = [Problem(what=f"value {value!r} has characters DeepSpeed's pdsh launcher does not quote",
                     where=f"--backend deepspeed: env {name}", fix=fix)
             for name, value in sorted(env.items())
             if not DEEPSPEED_QUOTED.fullmatch(value) or value != value.strip()]
    found += [Problem(what=f"argument {arg!r} has characters DeepSpeed's pdsh launcher does not quote",
                      where="--backend deepspeed: command", fix=fix)
              for arg in command if not DEEPSPEED_QUOTED.fullmatch(arg)]
    found += [Problem(what=f"{value!r} has characters DeepSpeed's pdsh launcher does not quote",
                      where=f"--backend deepspeed: {name}", fix=fix)
              for name, value in paths.items() if not DEEPSPEED_RAW.fullmatch(value)]
    return found


def deepspeed_runner_environment(parent: Mapping[str, str], additions: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment: the head's without secrets (DeepSpeed copies MLFLOW_*, PYTHON*, NCCL_*...
    from it into `export` statements on the pdsh command line), plus `additions`."""
    return {**{name: value for name, value in parent.items() if not is_secret(name)}, **additions}


def deepspeed_runner_command(fleet: Fleet, plan: LaunchPlan, *, state_dir: str, ssh_args: list[str],
                             cwd: str) -> DeepSpeedLaunch:
    """DeepSpeed's launcher (pdsh) with a generated hostfile and a `.deepspeed_env`.

    DeepSpeed exports only a few prefixes by default (not GLOO_*, HF_*...), so without the env file
    multi-host gloo resolves the hostname to 127.0.0.1 and fails. `DS_ENV_FILE` (an absolute path
    wins over DeepSpeed's ~ and . search) points it at our file, so nothing is written to the
    user's home or working dir. `ssh_args` reach pdsh's ssh through PDSH_SSH_ARGS_APPEND. DeepSpeed
    runs every host in the runner's `cwd` and with the runner's Python.
    """
    job = plan.job
    host_env = {name: value for name, value in plan.hosts[0].env.items() if not name.startswith("TORCHELASTIC_")}
    exported = {name: value for name, value in host_env.items() if not is_secret(name)}
    withheld = sorted(name for name in host_env if is_secret(name))
    unsafe = deepspeed_unsafe(env=exported, command=job.command, paths={"working dir": cwd, "python": job.python})
    if unsafe:
        raise DeepfleetError(problems=unsafe)
    hostfile, env_file = f"{state_dir}/hostfile", f"{state_dir}/deepspeed_env"
    command = list(job.command)
    if command[:2] == [job.python, "-m"]:
        script = ["--module", *command[2:]]
    elif command[:1] == [job.python]:
        script = command[1:]
    else:
        script = ["--no_python", *command]
    # --no_ssh_check: DeepSpeed's check runs plain `ssh host hostname`, ignoring the fleet's ssh
    # settings; deepfleet (doctor, and the interface probe before launch) has already checked ssh.
    argv = [job.python, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--launcher", "pdsh",
            "--master_addr", job.master_addr, "--master_port", str(job.master_port), "--no_ssh_check", *script]
    hosts = [replace(host, slots=ranks) for host, ranks in zip(fleet.hosts, plan.ranks_per_host)]
    env = {"DS_ENV_FILE": env_file, "PDSH_SSH_ARGS_APPEND": shlex.join(ssh_args)}
    env_lines = "".join(f"{name}={value}\n" for name, value in sorted(exported.items()))
    return DeepSpeedLaunch(argv=argv, env=env, files={hostfile: render_hostfile(hosts), env_file: env_lines},
                           withheld_secrets=withheld)


def slurm_script(plan: LaunchPlan) -> str:
    """An sbatch script: one srun task per node runs torchrun; the master is the allocation's first node.

    Secrets are not written into the script: sbatch/srun pass the submitting shell's environment.
    """
    job, env = plan.job, plan.hosts[0].env
    if len(set(plan.ranks_per_host)) > 1:
        raise DeepfleetError(f"hosts have different rank counts {list(plan.ranks_per_host)}", where="--backend slurm",
                             fix="an sbatch job gives every node the same GPUs: use equal hosts, or the torchrun "
                                 "backend")
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items())
                      if not is_secret(name))
    # Evaluated per task: every node gets its own SLURM_NODEID.
    per_node = " ".join([
        shlex.quote(job.python), "-m", "torch.distributed.run", '--nnodes="$SLURM_JOB_NUM_NODES"',
        '--node-rank="$SLURM_NODEID"', f"--nproc-per-node={job.nproc_per_node}", '--master-addr="$MASTER_ADDR"',
        f"--master-port={job.master_port}", "--tee=3", "--no-python", shlex.join(job.command)])
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name=deepfleet-{job.job_id}\n"
        f"#SBATCH --nodes={job.nnodes}\n"
        "#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --gpus-per-node={job.nproc_per_node}\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(job.workdir)}\n"
        f"{exports}"
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        "export MASTER_ADDR\n"
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + per_node)}\n"
    )


def manual_commands(plan: LaunchPlan) -> list[str]:
    """One shell line per host, for sites where hosts cannot ssh to each other. Secret values are
    shown as references (`HF_TOKEN="$HF_TOKEN"`): set them on each host before running the line."""
    lines = []
    for node_rank, host in enumerate(plan.hosts):
        shown = {name: (f'"${name}"' if is_secret(name) else shlex.quote(value))
                 for name, value in sorted(host.env.items())}
        assignments = " ".join(f"{name}={value}" for name, value in shown.items())
        torchrun = shlex.join(torchrun_argv(plan.job, node_rank=node_rank))
        lines.append(f"# on {host.label}\ncd {shlex.quote(plan.job.workdir)} && env {assignments} {torchrun}")
    return lines


def render_deepspeed(launch: DeepSpeedLaunch) -> str:
    lines = ["$ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in masked(launch.env).items()) + " "
             + shlex.join(launch.argv)]
    for path, content in launch.files.items():
        lines.append(f"--- {path}")
        lines.extend(content.rstrip("\n").splitlines())
    if launch.withheld_secrets:
        lines.append(f"note: {', '.join(launch.withheld_secrets)} not exported (DeepSpeed would put them on the "
                     "remote command line); set them on each host instead")
    return "\n".join(lines)
