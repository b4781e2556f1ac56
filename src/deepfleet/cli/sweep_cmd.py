"""`deepfleet sweep RECIPE --grid KEY=V1,V2 ...`: one `deepfleet train` per combination, ranked by
validation loss."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.cli.train_cmd import split_recipe_argument
from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import BatchRequest, options_given
from deepfleet.sweep.slurm_array import check_slurm_request
from deepfleet.sweep.results import COLUMNS, table_rows
from deepfleet.sweep.sweep_run import (SweepRequest, dry_run_text, finish, plan_sweep, run_here, run_on_slurm,
                                       slurm_script, trials_to_run)


def sweep(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (omit for the built-in demo recipe defaults)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides for every trial, e.g. train.max_steps=100"),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,...: values to try (repeat for more keys; every combination is a trial)"),
    random_count: Optional[int] = typer.Option(None, "--random", min=1, help="Run N distinct combinations drawn at random instead of all"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="With --random: the draw's seed (default 0; the same seed draws the same trials)"),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Trials at a time, each on its own group of the fleet's hosts (with --slurm: array tasks at a time)"),
    out: Optional[str] = typer.Option(None, "--out", help="The sweep dir (default: <output_dir>/sweep); run again into it to resume"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="On resume, run failed trials again (by default they are kept as failed)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trials and the command each runs (or the job array script); run nothing"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml: train on its hosts"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile: train on its hosts"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Ranks per host (as for train)"),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="Relaunch a trial after a failure (it resumes from its last checkpoint)"),
    hang_timeout: float = typer.Option(60.0, "--hang-timeout", min=1, help="Seconds without a training step before a trial is torn down"),
    slurm: bool = typer.Option(False, "--slurm", help="Submit the trials as one SLURM job array (one task per trial) and wait for it"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="With --slurm: nodes per trial"),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0, help="With --slurm: GPUs per node (0: CPU nodes)"),
    partition: Optional[str] = typer.Option(None, "--partition", help="With --slurm: the partition"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="With --slurm: time limit per trial, e.g. 04:00:00"),
    account: Optional[str] = typer.Option(None, "--account", help="With --slurm: the account to charge"),
) -> None:
    """Train one trial per combination of --grid values (or --random N of them) and rank them by validation
    loss: results.md/.csv/.json/.png in the sweep dir. Every trial is checked before any runs. Run the
    same command again to resume: finished trials are skipped, an interrupted one resumes from its checkpoint.
    Exit code: 0 all done, 1 a trial failed, 75 stopped by a signal (run again to resume)."""
    recipe_path, base_overrides = split_recipe_argument(recipe, overrides)
    if slurm and (fleet or hostfile):
        given = "--fleet" if fleet else "--hostfile"
        raise DeepfleetError(f"{given} does not go with --slurm: the trials train on the nodes SLURM gives them",
                             where="--slurm", fix=f"drop {given}")
    request = BatchRequest(nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time_limit,
                           account=account)
    scheduler_only = options_given(request)
    if scheduler_only and not slurm:
        raise DeepfleetError(f"{scheduler_only[0]} is for a sweep submitted with --slurm", where=scheduler_only[0],
                             fix=f"add --slurm, or drop {scheduler_only[0]}")
    plan = plan_sweep(SweepRequest(recipe_path=recipe_path, base_overrides=tuple(base_overrides), grid=tuple(grid or ()),
                                   random_count=random_count, seed=seed, parallel=parallel, out=out, fleet=fleet,
                                   hostfile=hostfile, nproc=nproc, max_restarts=max_restarts,
                                   hang_timeout=hang_timeout), slurm=slurm)
    if dry_run:
        print(slurm_script(plan, plan.trials, request) if slurm else dry_run_text(plan), end="")
        return
    if slurm:
        check_slurm_request(request)
    created = not plan.layout.root.exists()
    todo, lock = trials_to_run(plan, retry_failed=retry_failed, write=print)
    stopped = False
    if todo and slurm:
        run_on_slurm(plan, todo, request, created=created, write=print)
    elif todo:
        stopped = run_here(plan, todo, lock=lock, write=print)
    results, code = finish(plan, stopped=stopped)
    table = Table(title=f"sweep {plan.layout.root}: trials ranked by validation loss")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(results):
        table.add_row(*row)
    Console(highlight=False, width=160).print(table)
    print(f"results: {plan.layout.results('md')} (.csv, .json), plot {plan.layout.results('png')}")
    raise typer.Exit(code=code)
