"""`deepfleet launch [options] -- CMD ...`: any command as one distributed job on every host."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import List, Optional

import typer

from deepfleet.cli.fleet_cmd import ExcludeOpt, IncludeOpt

LAUNCH_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


class Backend(str, enum.Enum):
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    slurm = "slurm"
    manual = "manual"

def launch(
    command: List[str] = typer.Argument(None, help="The command every rank runs, after --"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile (host slots=N)"),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, help="Ranks per host (default: slots)"),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1, max=65535),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="Relaunch after a failure this many times"),
    hang_timeout: float = typer.Option(60.0, "--hang-timeout", min=1, help="Seconds without progress before teardown"),
    all_logs: bool = typer.Option(False, "--all-logs", help="Stream every rank's output, not only rank 0"),
    run_dir: Path = typer.Option(Path("runs/launch"), "--run-dir", file_okay=False, help="Where per-host logs go"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run on each host; run nothing"),
    backend: Backend = typer.Option(Backend.torchrun, "--backend", help="torchrun (supervised), deepspeed, slurm, manual"),
) -> None:
    """Run CMD on every host of the fleet as one supervised job, each rank with torchrun's environment."""
    from deepfleet.fleet.sources import resolve_fleet
    from deepfleet.fleet.ssh import options_for
    from deepfleet.launch.job import LaunchSettings
    from deepfleet.launch.backends import manual_commands
    from deepfleet.launch.run import (RunOptions, inspect_hosts, plan_for, run_deepspeed_backend,
                                      run_slurm_backend, run_with_restarts)

    resolved = resolve_fleet(fleet_file=fleet, hostfile=hostfile, include=include, exclude=exclude)
    settings = LaunchSettings(command=list(command or []), nproc_per_node=nproc_per_node, master_port=master_port)
    ssh_options = options_for(resolved)
    if dry_run or backend is not Backend.torchrun:
        # SLURM and manual hosts may not be reachable from here: they get no interface probe.
        probe = backend in (Backend.torchrun, Backend.deepspeed)
        if probe:
            resolved, interface = inspect_hosts(resolved, ssh_options)
        else:
            interface = None
        plan = plan_for(resolved, settings, ssh_options=ssh_options, extra_env={}, interface=interface)
        if backend is Backend.deepspeed:
            code = run_deepspeed_backend(resolved, plan, run_dir=run_dir, ssh_options=ssh_options, dry_run=dry_run)
        elif backend is Backend.slurm:
            code = run_slurm_backend(plan, run_dir=run_dir, dry_run=dry_run, environ=os.environ)
        else:
            typer.echo("\n".join(manual_commands(plan)) if backend is Backend.manual else plan.render())
            code = 0
        raise typer.Exit(code)
    outcome = run_with_restarts(resolved, settings, RunOptions(run_dir=run_dir, max_restarts=max_restarts,
                                                               hang_timeout=hang_timeout, all_logs=all_logs),
                                ssh_options=ssh_options, extra_env={})
    raise typer.Exit(outcome.exit_code)
