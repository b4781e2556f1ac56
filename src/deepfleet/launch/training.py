"""`deepfleet train RECIPE --fleet F`: the training program as a supervised job on every host.

Hosts need not share files, so the resolved recipe travels in the environment (on ssh's stdin,
like every variable), not as a path. Data and model paths must exist on every host (doctor checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from deepfleet.contract import RECIPE_ENV, TRAIN_MODULE
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.ssh import options_for
from deepfleet.launch.job import LaunchSettings
from deepfleet.launch.run import RunOptions, detect_interface, plan_for, run_with_restarts

TRAIN_COMMAND = ["python", "-m", TRAIN_MODULE]


def fleet_world_size(fleet: Fleet, nproc_per_node: int | None) -> int:
    return sum(nproc_per_node or host.slots for host in fleet.hosts)


def training_env(recipe_json: str, recipe_env: Mapping[str, str], *, cpu_threads: int | None) -> dict[str, str]:
    threads = {"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads else {}
    return {RECIPE_ENV: json.dumps(json.loads(recipe_json)), **threads, **recipe_env}


def train_on_fleet(fleet: Fleet, *, recipe_json: str, recipe_env: Mapping[str, str], output_dir: Path,
                   nproc_per_node: int | None, cpu_threads: int | None, max_restarts: int, hang_timeout: float,
                   all_logs: bool, dry_run: bool) -> int:
    """Run (or with dry_run, print) the job; per-host logs go to output_dir/logs/attempt-N/."""
    import asyncio

    settings = LaunchSettings(command=TRAIN_COMMAND, nproc_per_node=nproc_per_node)
    ssh_options = options_for(fleet)
    extra_env = training_env(recipe_json, recipe_env, cpu_threads=cpu_threads)
    if dry_run:
        interface = asyncio.run(detect_interface(fleet, ssh_options))
        print(plan_for(fleet, settings, ssh_options=ssh_options, extra_env=extra_env, interface=interface).render())
        return 0
    options = RunOptions(run_dir=output_dir, max_restarts=max_restarts, hang_timeout=hang_timeout, all_logs=all_logs)
    return run_with_restarts(fleet, settings, options, ssh_options=ssh_options, extra_env=extra_env)
