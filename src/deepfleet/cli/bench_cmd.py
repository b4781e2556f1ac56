"""`deepfleet bench comm` and `deepfleet bench train`: parse, call one function, render."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepfleet.bench.comm import DEFAULT_SIZES, OPERATIONS, parse_sizes
from deepfleet.cli.fleet_cmd import ExcludeOpt, IncludeOpt
from deepfleet import hardware
from deepfleet.errors import DeepfleetError

bench_app = typer.Typer(help="Bus bandwidth of the collectives; tokens/s, MFU and scaling efficiency.",
                        no_args_is_help=True)


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _plot_path(path: Optional[Path]) -> Optional[Path]:
    """Checked before the benchmark runs, not after it."""
    if path is not None and (path.suffix.lower() not in PLOT_SUFFIXES or not path.parent.is_dir()):
        raise typer.BadParameter(f"{path}: needs an existing directory and a {'/'.join(PLOT_SUFFIXES)} name")
    return path


def _operations(text: str) -> list[str]:
    chosen = [op.strip().replace("-", "_") for op in text.split(",") if op.strip()]
    unknown = [op for op in chosen if op not in OPERATIONS]
    if unknown or not chosen:
        raise DeepfleetError(f"unknown collective(s) {', '.join(unknown) or '(none)'}", where="--ops",
                             fix=f"choose from {', '.join(OPERATIONS)}")
    return chosen


@bench_app.command("comm")
def comm(
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml (default: ./fleet.yaml, SLURM, or this machine)"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile (host slots=N)"),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    sizes: str = typer.Option(DEFAULT_SIZES, "--sizes", help="SMALL..LARGE (x4 steps) or a list: 1MiB,64MiB"),
    ops: str = typer.Option(",".join(OPERATIONS), "--ops", help="collectives to measure"),
    budget: float = typer.Option(2.0, "--budget", min=0.01, help="seconds of timed iterations per size"),
    deadline: float = typer.Option(600.0, "--deadline", min=1, help="seconds for the whole measurement"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1,
                                                 help="ranks per host (default: slots; 2 on a lone CPU machine)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    png: Optional[Path] = typer.Option(None, "--png", callback=_plot_path, help="write a busbw-vs-size plot here"),
    run_dir: Path = typer.Option(Path("runs/bench"), "--run-dir", file_okay=False, help="where per-host logs go"),
) -> None:
    """All-reduce, all-gather and reduce-scatter across the fleet: algbw and busbw per size."""
    from deepfleet.bench.comm_render import comm_table, plot_comm, summary_line
    from deepfleet.bench.comm_run import CommOptions, ranks_per_host, run_comm_benchmark
    from deepfleet.fleet.sources import resolve_fleet

    resolved = resolve_fleet(fleet_file=fleet, hostfile=hostfile, include=include, exclude=exclude)
    gpus = hardware.gpu_count()
    options = CommOptions(sizes=parse_sizes(sizes), operations=_operations(ops), run_dir=run_dir,
                          budget_seconds=budget, deadline_seconds=deadline,
                          nproc_per_node=ranks_per_host(resolved, nproc_per_node, gpus=gpus))
    report = run_comm_benchmark(resolved, options, write=(lambda line: None) if as_json else print)
    if png:
        plot_comm(report, png)
    if as_json:
        print(report.to_json())
        return
    Console().print(comm_table(report))
    print(summary_line(report) + (f"; plot in {png}" if png else ""))


@bench_app.command("train")
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.micro_batch=8"),
    nodes: str = typer.Option("1,2", "--nodes", help="node counts to compare, e.g. 1,2,4 (the fleet's first N hosts)"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml (default: ./fleet.yaml, SLURM, or this machine)"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile (host slots=N)"),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    steps: int = typer.Option(20, "--steps", min=2, help="optimizer steps per node count"),
    warmup_steps: int = typer.Option(3, "--warmup-steps", min=0, help="first steps left out of the figures"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, help="ranks per host (default: slots)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
    png: Optional[Path] = typer.Option(None, "--png", callback=_plot_path, help="write tokens/s and efficiency plots here"),
) -> None:
    """Real tokens/s, MFU, per-host step time and scaling efficiency for each node count."""
    from deepfleet.bench.scaling import parse_node_counts
    from deepfleet.bench.scaling_render import plot_scaling, scaling_json, scaling_table
    from deepfleet.bench.train_run import ScalingOptions, run_scaling_benchmark
    from deepfleet.fleet.sources import resolve_fleet
    from deepfleet.plan.recipe_io import load_recipe

    loaded = load_recipe(recipe, list(overrides or []))
    resolved = resolve_fleet(fleet_file=fleet, hostfile=hostfile, include=include, exclude=exclude)
    options = ScalingOptions(node_counts=parse_node_counts(nodes, fleet_size=len(resolved.hosts)), steps=steps,
                             warmup_steps=warmup_steps, nproc_per_node=nproc_per_node)
    # The launcher prints progress; with --json it goes to stderr so stdout is only the JSON.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        results = run_scaling_benchmark(loaded, resolved, options)
    if png:
        plot_scaling(results, png)
    if as_json:
        print(scaling_json(results))
        return
    Console().print(scaling_table(results))
    if png:
        print(f"plot in {png}")
