"""`deepfleet train --slurm`: an sbatch job whose batch script runs `deepfleet train` inside the
allocation (which then reaches every node as an srun step), submitted and followed from here.

Preemption: the script asks SLURM for SIGTERM `grace` seconds before the time limit
(`--signal=B:TERM@`) and forwards it to the training, which writes a checkpoint and exits 75, as
it does on the SIGTERM of a preemption or `scancel`. The job is requeueable (`--requeue`): SLURM
requeues it after a preemption (PreemptMode=REQUEUE), `scontrol requeue` after anything else, and
the requeued job resumes from that checkpoint. The script never requeues by itself: it cannot tell
a time limit's SIGTERM from a cancel's. Secrets are never written into the script: sbatch passes
the submitting shell's environment to the job.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError, Problem
from deepfleet.launch.batch_job import (BatchRequest, in_job_train_argv, time_problems, training_lines,
                                        write_and_submit)

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def request_problems(request: BatchRequest, *, partition_gpus: int | None) -> list[Problem]:
    """What SLURM would accept but the run cannot use (`partition_gpus`: GPUs per node there, None: unknown)."""
    problems = time_problems(request)
    if partition_gpus is not None and request.gpus_per_node > partition_gpus:
        where = f"partition {request.partition}" if request.partition else "the default partition"
        problems.append(Problem(where=f"--gpus-per-node {request.gpus_per_node}",
                                what=f"{where} has {partition_gpus} GPU(s) per node",
                                fix=f"--gpus-per-node {partition_gpus} or less, or another --partition"))
    return problems


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's %G, e.g. `gpu:a100:8(S:0-1),nvme:1` -> 8; `(null)` -> 0."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def sbatch_lines(request: BatchRequest, *, job_name: str, workdir: str, log_pattern: str,
                 extra: Sequence[str] = ()) -> list[str]:
    """The script's first line and its #SBATCH lines (`extra`: more options, e.g. --array)."""
    options = [f"--job-name={job_name}", f"--nodes={request.nodes}", "--ntasks-per-node=1",
               f"--chdir={workdir}", f"--output={log_pattern}", "--open-mode=append",
               f"--signal=B:TERM@{request.grace_seconds}", "--requeue", *extra]
    options += [f"--gpus-per-node={request.gpus_per_node}"] if request.gpus_per_node else []
    options += [f"--{name}={value}" for name, value in (("partition", request.partition), ("time", request.time),
                                                        ("account", request.account)) if value]
    return ["#!/bin/bash", *(f"#SBATCH {shlex.quote(option)}" for option in options)]


def sbatch_script(request: BatchRequest, *, job_name: str, workdir: str, log_pattern: str,
                  train_argv: Sequence[str]) -> str:
    """The batch script: SBATCH lines, then the training (batch_job.training_lines)."""
    return "\n".join([
        *sbatch_lines(request, job_name=job_name, workdir=workdir, log_pattern=log_pattern),
        "# Written by `deepfleet train --slurm`. SIGTERM (preemption, the time limit, scancel) makes the training",
        f"# write a checkpoint and exit {EXIT_PREEMPTED}; requeued (by SLURM, or `scontrol requeue`), it resumes there.",
        *training_lines(train_argv),
        ""])


def job_fields(scontrol_line: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (values that hold spaces are cut at the first, which no field used here has)."""
    return dict(re.findall(r"(\w+)=(\S*)", scontrol_line))


def job_exit_code(fields: dict[str, str]) -> int:
    """The job's result as an exit code: its batch script's, or 128+signal when a signal ended it."""
    code, _, signal = fields.get("ExitCode", "1:0").partition(":")
    if fields.get("JobState") == "COMPLETED":
        return int(code or 0)
    return int(code) if code and int(code) else 128 + int(signal) if signal and int(signal) else 1


def submission_error(stderr: str, request: BatchRequest) -> DeepfleetError:
    """sbatch's own refusal as one line (its last `sbatch: error:` line)."""
    lines = [line.split("error:", 1)[1].strip() for line in stderr.splitlines() if "error:" in line]
    what = lines[-1] if lines else (stderr.strip().splitlines() or ["sbatch failed"])[-1]
    if "partition" in what.lower() and request.partition:
        return DeepfleetError(what, where=f"--partition {request.partition}", fix="see `sinfo -s` for the partitions")
    return DeepfleetError(what, where="sbatch", fix="check the --slurm options against `sinfo -s`")


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise DeepfleetError("sbatch not found on PATH", where="--slurm",
                             fix="run on a SLURM login node (or `module load slurm`), or train with --fleet")


def partition_gpus(partition: str | None) -> int | None:
    """GPUs per node of the partition (the most any node has), from sinfo; None when sinfo cannot say."""
    argv = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return max(gpus_in_gres(line) for line in lines) if done.returncode == 0 and lines else None


def submit(script: Path, request: BatchRequest) -> int:
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise submission_error(done.stderr, request)
    return int(done.stdout.strip().split(";")[0])


def job_state(job_id: int) -> dict[str, str] | None:
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    return job_fields(done.stdout) if done.returncode == 0 and "JobState=" in done.stdout else None


def follow(job_id: int, log: Path, write: Callable[[str], None], *, poll: float = 1.0) -> int:
    """Print the job's log as it grows until the job ends (a requeue is followed); its exit code."""
    offset, fields, last_state = 0, None, ""
    while True:
        fields = job_state(job_id) or fields
        if log.exists():
            with log.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                write(line)
        state = (fields or {}).get("JobState", "")
        if state != last_state and state in ("PENDING", "REQUEUED") and last_state:
            write(f"# job {job_id} {state.lower()} (restarts: {(fields or {}).get('Restarts', '?')})")
        last_state = state
        if fields is None or state not in ACTIVE_STATES:
            break
        time.sleep(poll)
    if fields is None:
        raise DeepfleetError(f"job {job_id} is no longer known to SLURM", where="scontrol show job",
                             fix=f"read its log: {log}", exit_code=1)
    code = job_exit_code(fields)
    write(f"# job {job_id} {fields.get('JobState', '?')} (exit code {fields.get('ExitCode', '?')})")
    if code == EXIT_PREEMPTED:
        write(f"# it stopped at a complete checkpoint: `scontrol requeue {job_id}` resumes it "
              f"(then `deepfleet logs {job_id} --follow`)")
    elif code != 0:
        write("# the same `deepfleet train ... --slurm` command submits it again on the nodes SLURM gives it, "
              "resuming from the newest complete checkpoint")
    return code


def train_on_slurm(request: BatchRequest, *, train_args: Sequence[str], output_dir: Path, detach: bool,
                   dry_run: bool = False, write: Callable[[str], None] = print) -> int:
    """Check, write `output_dir/slurm/train.sbatch`, submit, and follow the job (or return at once);
    `dry_run` prints the script instead."""
    if not dry_run:
        require_sbatch()
    gpus = partition_gpus(request.partition) if request.gpus_per_node and not dry_run else None
    problems = request_problems(request, partition_gpus=gpus)
    if problems:
        raise DeepfleetError(problems=problems)
    slurm_dir = output_dir / "slurm"
    text = sbatch_script(request, job_name=f"deepfleet-{output_dir.name}", workdir=str(Path.cwd()),
                         log_pattern=str(slurm_dir / "job-%j.log"),
                         train_argv=in_job_train_argv(train_args))
    if dry_run:
        write(text)
        return 0
    script = slurm_dir / "train.sbatch"
    job_id = write_and_submit(text, script, lambda path: submit(path, request))
    log = slurm_dir / f"job-{job_id}.log"
    write(f"submitted job {job_id} ({script}); log: {log}")
    if detach:
        write(f"follow it: deepfleet logs {job_id} --follow; stop it: deepfleet cancel {job_id}")
        return 0
    try:
        return follow(job_id, log, write)
    except KeyboardInterrupt:
        write(f"detached; job {job_id} keeps running (deepfleet cancel {job_id} stops it)")
        return 130
