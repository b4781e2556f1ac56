"""`deepfleet train`: the training program as one supervised job, on this machine or on every host.

A lone local machine is a fleet of one host (run without ssh, its rendezvous on a free loopback
port); a fleet.yaml, hostfile or allocation adds hosts. Either way the same agent, supervisor,
logs, error and preemption protocol run. Hosts need not share files, so the resolved recipe
travels in the environment (on ssh's stdin, like every variable), not as a path.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from deepfleet.contract import EXIT_PREEMPTED, PREPARED_DATA_ENV, RECIPE_ENV, TRAIN_MODULE, preempted_at
from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.ssh import options_for
from deepfleet.launch.job import LaunchSettings
from deepfleet.fleet.network import InterfaceChoice
from deepfleet.launch.run import RunOptions, plan_for, run_with_restarts
from deepfleet.launch.startup_timings import HeadStartup
from deepfleet.launch.supervisor import JobOutcome

TRAIN_COMMAND = ["python", "-m", TRAIN_MODULE]
DEFAULT_CPU_RANKS = 2


def default_nproc(*, gpus: int) -> int:
    """One rank per visible GPU; without GPUs, 2 CPU ranks (gloo), enough to exercise data parallelism."""
    return gpus if gpus > 0 else DEFAULT_CPU_RANKS


def cpu_threads_per_rank(*, cpu_count: int, nproc: int) -> int:
    return max(1, cpu_count // nproc)


def is_local_only(fleet: Fleet) -> bool:
    return len(fleet.hosts) == 1 and fleet.hosts[0].local


def training_fleet(fleet: Fleet, *, nproc: int | None, gpus: int) -> Fleet:
    """The local machine alone runs `nproc` ranks (default: one per GPU, else 2 CPU ranks) with its
    rendezvous on a free port (port 0: bound by the store itself, so two local runs never collide)."""
    if not is_local_only(fleet):
        return fleet
    host = replace(fleet.hosts[0], slots=nproc or default_nproc(gpus=gpus))
    return replace(fleet, hosts=(host,), master_port=0)


def training_env(recipe_json: str, recipe_env: Mapping[str, str], *, cpu_threads: int | None) -> dict[str, str]:
    threads = {"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads else {}
    return {RECIPE_ENV: json.dumps(json.loads(recipe_json)), **threads, **recipe_env}


@dataclass(frozen=True, kw_only=True)
class TrainingJob:
    fleet: Fleet
    recipe_json: str                 # the resolved recipe every rank loads
    recipe_env: Mapping[str, str]    # the recipe's env: section
    output_dir: Path                 # per-host logs go to output_dir/logs/attempt-N/
    cpu_threads: int | None = None   # OMP_NUM_THREADS per rank on CPU hosts; None leaves it alone
    interface: InterfaceChoice | None = None   # the subnet the hosts share; None: one host, or not known yet
    prepared_data: str | None = None  # the head's prepared-data entry (deepfleet prepare); None: ranks tokenize

    @property
    def settings(self) -> LaunchSettings:
        return LaunchSettings(command=TRAIN_COMMAND)

    @property
    def world_size(self) -> int:
        return sum(host.slots or 0 for host in self.fleet.hosts)

    @property
    def env(self) -> dict[str, str]:
        env = training_env(self.recipe_json, self.recipe_env, cpu_threads=self.cpu_threads)
        return {**env, PREPARED_DATA_ENV: self.prepared_data} if self.prepared_data else env


def render_training_plan(job: TrainingJob) -> str:
    """What would run on every host, secrets masked (--dry-run, and the commands `deepfleet plan` shows)."""
    text = plan_for(job.fleet, job.settings, ssh_options=options_for(job.fleet), extra_env=job.env,
                    interface=job.interface).render()
    if job.interface is None and len(job.fleet.hosts) > 1:
        text += "\n(at launch: the master address and NCCL/GLOO interface variables of the subnet all hosts share)"
    return text


def run_training_job(job: TrainingJob, *, max_restarts: int, hang_timeout: float, all_logs: bool,
                     write: Callable[[str], None] = print, head_startup: HeadStartup | None = None,
                     timings_table: bool = False) -> JobOutcome:
    options = RunOptions(run_dir=job.output_dir, max_restarts=max_restarts, hang_timeout=hang_timeout,
                         all_logs=all_logs, startup_timings=True, head_startup=head_startup,
                         timings_table=timings_table)
    return run_with_restarts(job.fleet, job.settings, options, ssh_options=options_for(job.fleet),
                             extra_env=job.env, interface=job.interface, write=write)


def run_training(job: TrainingJob, *, max_restarts: int = 0, hang_timeout: float = 60.0, all_logs: bool = False,
                 write: Callable[[str], None] = print, head_startup: HeadStartup | None = None,
                 timings_table: bool = False) -> float:
    """Run the job to the end; returns wall seconds, or raises what `outcome_error` makes of it. A run
    that stops on bad input leaves no output_dir behind when it created it. `head_startup`: the
    command's own phases, for the startup timings (`timings_table`: all of them as a table)."""
    existed = job.output_dir.exists()
    started = time.perf_counter()
    outcome = run_training_job(job, max_restarts=max_restarts, hang_timeout=hang_timeout, all_logs=all_logs,
                               write=write, head_startup=head_startup, timings_table=timings_table)
    error = outcome_error(outcome, log_dir=job.output_dir / "logs")
    if error is None:
        return time.perf_counter() - started
    if outcome.bad_input and not existed:
        shutil.rmtree(job.output_dir, ignore_errors=True)
    raise error


def outcome_error(outcome: JobOutcome, *, log_dir: Path) -> DeepfleetError | None:
    """How a finished job ends the command: nothing (success), the ranks' own one-line errors (exit 2),
    "resumable" (exit 75), or the failure the summary described."""
    if outcome.exit_code == 0:
        return None
    if outcome.bad_input:
        return DeepfleetError(problems=[Problem(what=line.removeprefix("error: ")) for line in outcome.bad_input])
    if outcome.preempted:
        found = preempted_at(outcome.preempted_line or "")
        what = (f"stopped by signal after step {found[0]}; checkpoint {found[1]} is complete" if found
                else "stopped by signal after writing a checkpoint")
        return DeepfleetError(what, where="train", fix="run the same command again to resume",
                              exit_code=EXIT_PREEMPTED)
    why = outcome.failure.why if outcome.failure else "stopped by signal"
    return DeepfleetError(f"training failed: {why}", where="train", exit_code=outcome.exit_code,
                          fix=f"see the summary above and the host logs in {log_dir}")
