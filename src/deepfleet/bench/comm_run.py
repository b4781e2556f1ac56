"""`deepfleet bench comm`: the comm worker as one supervised job on every host; rank 0's report comes back.

Hosts may not share files, so rank 0 prints its report as one marked line on stdout; the supervisor
streams rank 0's lines to the head (and writes each host's log under run_dir/logs/attempt-0/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deepfleet.bench.comm import CommReport, find_report
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.ssh import options_for
from deepfleet.launch.job import LaunchSettings
from deepfleet.launch.run import RunOptions, run_with_restarts

WORKER_MODULE = "deepfleet.bench.comm_worker"
LOCAL_CPU_RANKS = 2


@dataclass(frozen=True, kw_only=True)
class CommOptions:
    sizes: list[int]
    operations: list[str]
    run_dir: Path
    budget_seconds: float = 2.0          # timed iterations per size and collective
    max_iterations: int = 50
    deadline_seconds: float = 600.0      # the whole measurement, all sizes
    memory_fraction: float = 0.5         # of each rank's share of free memory
    nproc_per_node: int | None = None


def worker_command(options: CommOptions) -> list[str]:
    return ["python", "-m", WORKER_MODULE, "--sizes", ",".join(str(s) for s in options.sizes),
            "--operations", ",".join(options.operations), "--budget", f"{options.budget_seconds:g}",
            "--max-iterations", str(options.max_iterations), "--deadline", f"{options.deadline_seconds:g}",
            "--memory-fraction", f"{options.memory_fraction:g}"]


def ranks_per_host(fleet: Fleet, requested: int | None, *, gpus: int) -> int | None:
    """The local machine alone on CPU gets 2 ranks, so there is something to communicate."""
    if requested:
        return requested
    if len(fleet.hosts) == 1 and fleet.hosts[0].local and gpus == 0:
        return LOCAL_CPU_RANKS
    return None


def run_comm_benchmark(fleet: Fleet, options: CommOptions, *, write: Callable[[str], None] = print) -> CommReport:
    """Run the worker on every host and return rank 0's report; DeepfleetError when the job fails."""
    settings = LaunchSettings(command=worker_command(options), nproc_per_node=options.nproc_per_node)
    run_dir = options.run_dir / time.strftime("comm-%Y%m%d-%H%M%S")
    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        if "@@deepfleet-bench-comm" not in line:
            write(line)

    # The worker writes no training heartbeat, so the supervisor watches exits and links only.
    code = run_with_restarts(fleet, settings, RunOptions(run_dir=run_dir, max_restarts=0, hang_timeout=60.0),
                             ssh_options=options_for(fleet), extra_env={}, write=collect).exit_code
    report = find_report(lines) or _report_from_logs(run_dir)
    if code != 0 or report is None:
        raise DeepfleetError(f"the comm benchmark failed (exit {code})", where=str(run_dir / "logs"),
                             fix="read the host logs there; `deepfleet doctor` checks the fleet")
    return report


def _report_from_logs(run_dir: Path) -> CommReport | None:
    logs = sorted((run_dir / "logs").glob("attempt-*/*.log"))
    for log in logs:
        report = find_report(log.read_text(errors="replace").splitlines())
        if report is not None:
            return report
    return None
