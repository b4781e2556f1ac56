"""Plan a job on a fleet (pure): for every host, the argv the head runs and the env sent on stdin."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Mapping

from deepfleet.contract import RECIPE_ENV
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.network import InterfaceChoice
from deepfleet.fleet.ssh import SshOptions, host_argv
from deepfleet.launch.commands import JobSpec, agent_argv, agent_env
from deepfleet.launch.environment import job_environment
from deepfleet.env_vars import masked
from deepfleet.launch.supervisor import HostProcess


@dataclass(frozen=True, kw_only=True)
class LaunchSettings:
    command: list[str]
    nproc_per_node: int | None = None      # None: each host's slots
    master_port: int | None = None         # None: the fleet's
    lifeline_timeout: float = 15.0
    grace: float = 60.0


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    job: JobSpec
    hosts: list[HostProcess]
    interface: InterfaceChoice | None
    ranks_per_host: tuple[int, ...]        # in fleet order; hosts may differ (8 + 4 GPUs)

    @property
    def world_size(self) -> int:
        return sum(self.ranks_per_host)

    def render(self) -> str:
        """Exactly what would run on each host, secrets masked (the --dry-run output)."""
        lines = [f"job {self.job.job_id}: {self.job.nnodes} host(s), {self.world_size} rank(s), master {self.job.master_addr}:"
                 f"{self.job.master_port}"]
        for host in self.hosts:
            lines.append(f"[{host.label}] {shlex.join(host.argv)}")
            lines.extend(f"[{host.label}]   env {name}={_shown(name, value)}"
                         for name, value in sorted(masked(host.env).items()))
        return "\n".join(lines)


def _shown(name: str, value: str) -> str:
    # The resolved recipe is the recipe file with overrides applied: its size says enough.
    return f"<the resolved recipe: {len(value):,} bytes of JSON>" if name == RECIPE_ENV else value


def master_address(fleet: Fleet, interface: InterfaceChoice | None) -> str:
    """Where every host reaches the rendezvous: the master's address on the chosen private interface."""
    master = fleet.master
    if len(fleet.hosts) == 1 and master.local:
        return "127.0.0.1"
    if interface and master.name in interface.addresses:
        return interface.addresses[master.name]
    return master.address


def rank_command(command: list[str], python: str) -> list[str]:
    """A leading bare `python`/`python3` means the fleet's Python (the venv deepfleet checked), as with
    DeepSpeed's launcher, which runs scripts with its own interpreter."""
    if command and command[0] in ("python", "python3"):
        return [python, *command[1:]]
    return list(command)


def _nproc(host: Host, settings: LaunchSettings) -> int | None:
    return settings.nproc_per_node or host.slots


def plan_launch(fleet: Fleet, settings: LaunchSettings, *, job_id: str, cwd: str, parent_env: Mapping[str, str],
                extra_env: Mapping[str, str], interface: InterfaceChoice | None,
                ssh_options: SshOptions) -> LaunchPlan:
    """`cwd` is the head's working directory: every host runs in the same absolute path unless the fleet says."""
    if not settings.command:
        raise DeepfleetError("no command to launch", where="command line",
                             fix="put the command after --, e.g. deepfleet launch -- python train.py")
    unknown = [host.name for host in fleet.hosts if _nproc(host, settings) is None]
    if unknown:
        raise DeepfleetError(f"slots of host(s) {', '.join(unknown)} unknown", where=fleet.source,
                             fix="set slots: for them (one rank per GPU), or use the torchrun backend, which asks "
                                 "each host for its GPUs")
    ranks = tuple(_nproc(host, settings) or 0 for host in fleet.hosts)
    if interface and interface.outside:
        raise DeepfleetError(f"host(s) {', '.join(interface.outside)} share no subnet with the others",
                             where=fleet.source, fix="run `deepfleet doctor`; set `interface:` per host in fleet.yaml")
    job = JobSpec(job_id=job_id, command=rank_command(settings.command, fleet.python), python=fleet.python,
                  workdir=fleet.workdir or cwd, master_addr=master_address(fleet, interface),
                  master_port=fleet.master_port if settings.master_port is None else settings.master_port,
                  nnodes=len(fleet.hosts),
                  nproc_per_node=ranks[0], lifeline_timeout=settings.lifeline_timeout, grace=settings.grace)
    hosts = []
    for node_rank, host in enumerate(fleet.hosts):
        chosen = host.interface or (interface.per_host.get(host.name) if interface else None)
        env = job_environment(parent_env, interface=chosen, fabric=interface.fabric.env if interface and interface.fabric
                              else None, extra={**dict(host.env), **dict(extra_env)})
        python = fleet.python_for(host)
        # Each host has its own rank count; global ranks stay contiguous in host order.
        host_job = JobSpec(**{**vars(job), "python": python, "env": env, "nproc_per_node": ranks[node_rank],
                              "first_rank": sum(ranks[:node_rank]), "world_size": sum(ranks),
                              "command": rank_command(settings.command, python)})
        hosts.append(HostProcess(label=host.name, argv=host_argv(host, agent_argv(host_job, node_rank=node_rank),
                                                                 options=ssh_options),
                                 env=agent_env(host_job),
                                 transport="local" if host.local else "srun" if host.via_srun else "ssh"))
    return LaunchPlan(job=job, hosts=hosts, interface=interface, ranks_per_host=ranks)
