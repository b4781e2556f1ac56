"""Run a planned job: find the shared interface, supervise, and restart after failures."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.discover import probe_fleet
from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.host_hardware import hardware_from_facts, with_slots
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.network import InterfaceChoice, choose_fabric, select_shared_interface
from deepfleet.fleet.ssh import SshOptions, ssh_option_args
from deepfleet.launch.backends import (deepspeed_runner_command, deepspeed_runner_environment, render_deepspeed,
                                       slurm_script)
from deepfleet.launch.commands import new_job_id
from deepfleet.launch.job import LaunchPlan, LaunchSettings, plan_launch
from deepfleet.launch.startup_timings import HeadStartup, StartupWatch, finish_startup
from deepfleet.launch.supervisor import JobOutcome, Supervisor, SupervisorOptions, render_summary

# A host that is the first to fail this many attempts in a row is named and the run stops:
# restarting onto the same broken node only burns time.
SAME_HOST_FAILURE_LIMIT = 2


def interface_from_facts(fleet: Fleet, facts: Sequence[HostFacts]) -> InterfaceChoice | None:
    """The subnet every host shares, from the hosts' probe facts; None for a single host."""
    if len(fleet.hosts) == 1:
        return None
    preferred = {host.name: host.interface for host in fleet.hosts if host.interface}
    known = {f.host.name: f.get("interfaces") for f in facts if f.get("interfaces") is not None}
    choice = select_shared_interface(known, preferred, {host.name: host.address for host in fleet.hosts})
    if fleet.infiniband == "off":
        return choice
    return replace(choice, fabric=choose_fabric({f.host.name: f.get("infiniband", default=[]) or [] for f in facts}))


def inspect_hosts(fleet: Fleet, options: SshOptions) -> tuple[Fleet, InterfaceChoice | None]:
    """The fleet with unconfigured slots set to each host's GPU count, and the subnet every host shares:
    one probe round trip, none for a single host whose slots are known."""
    host = fleet.hosts[0]
    if len(fleet.hosts) == 1 and host.slots is not None and host.gpus is None and not host.skip_gpus:
        return fleet, None
    facts = probe_fleet(fleet, options)
    return with_slots(fleet, [hardware_from_facts(f) for f in facts]), interface_from_facts(fleet, facts)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    run_dir: Path
    max_restarts: int = 0
    hang_timeout: float = 60.0
    all_logs: bool = False
    startup_timings: bool = False             # the ranks report their startup (deepfleet.train); see startup_timings.py
    head_startup: HeadStartup | None = None   # the command's phases before the launch (deepfleet train)
    timings_table: bool = False               # print every startup phase after each attempt (--timings)


def plan_for(fleet: Fleet, settings: LaunchSettings, *, ssh_options: SshOptions, extra_env: Mapping[str, str],
             interface: InterfaceChoice | None) -> LaunchPlan:
    return plan_launch(fleet, settings, job_id=new_job_id(), cwd=os.getcwd(), parent_env=os.environ,
                       extra_env=extra_env, interface=interface, ssh_options=ssh_options)


def run_with_restarts(fleet: Fleet, settings: LaunchSettings, options: RunOptions, *, ssh_options: SshOptions,
                      extra_env: Mapping[str, str], interface: InterfaceChoice | None = None,
                      write: Callable[[str], None] = print) -> JobOutcome:
    """Launch, supervise, and relaunch up to `max_restarts` times; returns the last attempt's outcome.
    `interface`: the shared subnet when the caller already inspected the hosts."""
    if interface is None:
        fleet, interface = inspect_hosts(fleet, ssh_options)
    if interface and interface.network:
        write(f"interface: {interface.network} via {', '.join(sorted(set(interface.per_host.values())))}")
    if interface and interface.fabric and interface.fabric.env:
        write(f"network: {interface.fabric.note}")
    failed_first: list[str] = []
    for attempt in range(options.max_restarts + 1):
        attempt_started = time.monotonic()
        plan = plan_for(fleet, settings, ssh_options=ssh_options, extra_env=extra_env, interface=interface)
        log_dir = options.run_dir / "logs" / f"attempt-{attempt}"
        ranks = (f"x {plan.job.nproc_per_node} rank(s)" if len(set(plan.ranks_per_host)) == 1
                 else f"({'+'.join(map(str, plan.ranks_per_host))} ranks)")
        write(f"launching {plan.job.job_id} on {plan.job.nnodes} host(s) {ranks}"
              + (f" (restart {attempt}/{options.max_restarts})" if attempt else "") + f"; logs in {log_dir}")
        startup = StartupWatch(attempt=attempt, head=options.head_startup, log_dir=log_dir, started=attempt_started,
                               transports={host.label: host.transport for host in plan.hosts}) \
            if options.startup_timings else None
        supervisor = Supervisor(plan.hosts, SupervisorOptions(log_dir=log_dir, hang_timeout=options.hang_timeout,
                                                              all_logs=options.all_logs), write=write, startup=startup)
        outcome = asyncio.run(supervisor.run())
        write(render_summary(outcome))
        for line in finish_startup(startup, table=options.timings_table) if startup else ():
            write(line)
        if outcome.exit_code == 0 or outcome.stopped_by_signal or outcome.preempted or outcome.failure is None \
                or outcome.bad_input:   # the same input fails the same way on every restart
            return outcome
        failed_first.append(outcome.failure.host)
        recent = failed_first[-SAME_HOST_FAILURE_LIMIT:]
        if len(recent) == SAME_HOST_FAILURE_LIMIT and len(set(recent)) == 1 and attempt < options.max_restarts:
            write(f"host {recent[0]} failed first {SAME_HOST_FAILURE_LIMIT} times in a row; not restarting. "
                  f"Fix or remove it from {fleet.source}, then run again (training resumes from the last checkpoint).")
            return outcome
    return outcome


def run_deepspeed_backend(fleet: Fleet, plan: LaunchPlan, *, run_dir: Path, ssh_options: SshOptions,
                          dry_run: bool, write: Callable[[str], None] = print) -> int:
    """DeepSpeed's own launcher over pdsh. Its supervision is its own: it waits for pdsh to end."""
    launch = deepspeed_runner_command(fleet, plan, state_dir=str(run_dir.resolve()),
                                      ssh_args=ssh_option_args(ssh_options), cwd=os.getcwd())
    write(render_deepspeed(launch))
    if dry_run:
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    for path, content in launch.files.items():
        Path(path).write_text(content)
    return subprocess.run(launch.argv, env=deepspeed_runner_environment(os.environ, launch.env), check=False).returncode


def run_slurm_backend(plan: LaunchPlan, *, run_dir: Path, dry_run: bool, environ: Mapping[str, str],
                      write: Callable[[str], None] = print) -> int:
    """Write the sbatch script; run it when already inside an allocation, else say how to submit it."""
    script = slurm_script(plan)
    path = run_dir / "job.sbatch"
    if dry_run:
        write(f"--- {path}\n{script}")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if not environ.get("SLURM_JOB_ID"):
        raise DeepfleetError("not inside a SLURM allocation", where="--backend slurm",
                             fix=f"submit the script deepfleet wrote: sbatch {path}")
    return subprocess.run(["bash", str(path)], check=False).returncode
