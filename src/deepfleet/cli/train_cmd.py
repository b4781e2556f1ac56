"""`deepfleet train`, `deepfleet generate` and `deepfleet demo`: one supervised launch, here or on a fleet."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.cli.fleet_cmd import ExcludeOpt, IncludeOpt
from deepfleet.cli.sync_cmd import render as render_sync
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.sources import resolve_fleet
from deepfleet.launch.batch_job import BatchRequest, options_given
from deepfleet.launch.pbs_submit import train_on_pbs
from deepfleet.launch.slurm_submit import train_on_slurm
from deepfleet.launch.startup_timings import HeadClock
from deepfleet.launch.training import run_training
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.process_start import process_started_monotonic
from deepfleet.prepare import dry_run_report, prepare_training, sync_inputs, with_prepared_data

DEMO_RECIPE = Path(str(resources.files("deepfleet") / "assets" / "demo.yaml"))   # shipped in the package


def split_recipe_argument(recipe: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`deepfleet train train.max_steps=5` (no recipe file): the first argument is an override."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, overrides


def _one_line(answer: str, width: int = 24) -> str:
    return answer.replace("\n", "⏎")[:width]


def _submit(request: BatchRequest, *, slurm: bool, pbs: bool, conflicting: list[str], train_args: list[str],
            output_dir: Path, detach: bool, dry_run: bool) -> int:
    """`train --slurm` / `train --pbs`: the job's exit code (0 once submitted, for --detach and PBS)."""
    if slurm and pbs:
        raise DeepfleetError("--slurm and --pbs both given", where="--pbs", fix="submit to one scheduler")
    scheduler = "--slurm" if slurm else "--pbs"
    if conflicting:
        raise DeepfleetError(f"{conflicting[0]} does not go with {scheduler}: the job trains on the nodes the "
                             "scheduler gives it", where=scheduler, fix=f"drop {conflicting[0]}")
    if slurm:
        return train_on_slurm(request, train_args=train_args, output_dir=output_dir, detach=detach, dry_run=dry_run)
    return train_on_pbs(request, train_args=train_args, output_dir=output_dir, dry_run=dry_run)


def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (omit for the built-in demo recipe defaults)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Ranks per host (this machine alone: default one per GPU, else 2 CPU ranks)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run on each host and its environment (secrets masked); run nothing"),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over even when output_dir has checkpoints"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml: train on every host of it"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile: train on every host of it"),
    include: Optional[str] = IncludeOpt,
    exclude: Optional[str] = ExcludeOpt,
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="Relaunch after a failure (training resumes from the last checkpoint)"),
    hang_timeout: float = typer.Option(60.0, "--hang-timeout", min=1, help="Seconds without a training step before the job is torn down"),
    all_logs: bool = typer.Option(False, "--all-logs", help="Stream every rank, not only rank 0"),
    facts: Optional[str] = typer.Option(None, "--facts", help="With --dry-run: the hosts' facts from a `deepfleet doctor --record` file instead of asking them over ssh"),
    sync: bool = typer.Option(False, "--sync", help="First copy the model dir and data files to every host that lacks them (deepfleet sync)"),
    slurm: bool = typer.Option(False, "--slurm", help="Submit as a SLURM job (sbatch) and follow it; requeued after a preemption, it resumes"),
    pbs: bool = typer.Option(False, "--pbs", help="Submit as a PBS Pro/OpenPBS job (qsub) and return; submitted again after a stop, it resumes"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="With --slurm/--pbs: nodes to ask for"),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0, help="With --slurm/--pbs: GPUs per node (0: CPU nodes)"),
    partition: Optional[str] = typer.Option(None, "--partition", help="With --slurm/--pbs: the partition / queue (default: the site's)"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="With --slurm/--pbs: time limit, e.g. 04:00:00 (default: the partition's)"),
    account: Optional[str] = typer.Option(None, "--account", help="With --slurm/--pbs: the account to charge"),
    detach: bool = typer.Option(False, "--detach", help="With --slurm: submit and return (deepfleet logs JOBID --follow); --pbs always returns"),
    timings: bool = typer.Option(False, "--timings", help="Print the seconds of every startup phase, command to first step (always: one line, and logs/attempt-N/startup.json)"),
) -> None:
    """Train on this machine or on every host (./fleet.yaml, --fleet, --hostfile, SLURM/PBS); saves output_dir/final.

    Resumes from the newest complete checkpoint in output_dir. Exit code 75: stopped by a signal
    after writing a checkpoint; run the same command again to resume.
    """
    clock = HeadClock(process_started=process_started_monotonic(), entered=time.monotonic())
    recipe_path, override_list = split_recipe_argument(recipe, overrides)
    override_list += ["resume=false"] if no_resume else []
    loaded = load_recipe(recipe_path, override_list)
    if facts and not dry_run:
        raise DeepfleetError("--facts is for --dry-run only", where="--facts",
                             fix="add --dry-run, or drop --facts: a real run asks the hosts themselves")
    request = BatchRequest(nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time_limit,
                           account=account)
    if slurm or pbs:
        conflicting = [name for name, given in (("--fleet", fleet), ("--hostfile", hostfile), ("--include", include),
                                                ("--exclude", exclude), ("--sync", sync), ("--facts", facts)) if given]
        passed = [*([str(Path(recipe_path).resolve())] if recipe_path else []), *override_list,
                  f"--max-restarts={max_restarts}", f"--hang-timeout={hang_timeout:g}",
                  *([f"--nproc={nproc}"] if nproc else []), *(["--all-logs"] if all_logs else []),
                  *(["--timings"] if timings else [])]
        raise typer.Exit(code=_submit(request, slurm=slurm, pbs=pbs, conflicting=conflicting, train_args=passed,
                                      output_dir=loaded.output_path.resolve(), detach=detach, dry_run=dry_run))
    scheduler_only = options_given(request) + (["--detach"] if detach else [])
    if scheduler_only:
        raise DeepfleetError(f"{scheduler_only[0]} is for a job submitted with --slurm or --pbs", where=scheduler_only[0],
                             fix=f"add --slurm (or --pbs), or drop {scheduler_only[0]}: a fleet trains on its own hosts")
    if sync and dry_run:
        raise DeepfleetError("--sync copies files and --dry-run changes nothing", where="--sync",
                             fix="run `deepfleet sync` first, or drop --dry-run")
    hosts = resolve_fleet(fleet_file=fleet, hostfile=hostfile, include=include, exclude=exclude)
    if sync:
        report = sync_inputs(loaded, hosts)
        if report is None:
            print("sync: nothing to copy (this machine alone, or no local model dir or data files)")
        else:
            render_sync(report)
            if (error := report.error()):
                raise error
    prepared = prepare_training(loaded, hosts, nproc=nproc, facts_file=facts)
    clock.end("planning")   # with --sync, the copy is in it too
    if prepared.note:
        print(f"# {prepared.note}")
    if dry_run:
        print(dry_run_report(prepared).table(), end="")
        return
    job = with_prepared_data(prepared)
    clock.end("data")
    seconds = run_training(job, max_restarts=max_restarts, hang_timeout=hang_timeout, all_logs=all_logs,
                           head_startup=clock.startup(), timings_table=timings)
    print(f"done in {seconds:.0f} s: {prepared.recipe.output_path / 'final'}")


def prepare(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (omit for the built-in demo recipe defaults)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. data.max_length=1024"),
) -> None:
    """Tokenize the recipe's data once into the prepared-data cache that every rank memory-maps
    (data.cache_dir); `deepfleet train` does this itself when the cache lacks it."""
    from deepfleet.data_cache import prepare_recipe_data

    recipe_path, override_list = split_recipe_argument(recipe, overrides)
    print(prepare_recipe_data(load_recipe(recipe_path, override_list)).summary())


def generate(
    model_dir: str = typer.Argument(..., help="A dir saved by deepfleet train (full model or LoRA adapter)"),
    prompt: str = typer.Argument(..., help="The user message"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
) -> None:
    """Apply the chat template, generate greedily, print the answer."""
    from transformers.utils import logging as transformers_logging

    from deepfleet.train.generate import generate_answers, load_for_generation

    transformers_logging.disable_progress_bar()
    model, tokenizer = load_for_generation(model_dir)
    print(generate_answers(model, tokenizer, [[{"role": "user", "content": prompt}]],
                           max_new_tokens=max_new_tokens)[0])


def demo(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of the demo recipe (deepfleet/assets/demo.yaml)"),
    nproc: int = typer.Option(2, "--nproc", min=1, help="Local ranks"),
    heldout: int = typer.Option(100, "--heldout", min=1, help="Held-out prompts to score"),
) -> None:
    """Train the built-in tiny model on the built-in tasks; print held-out answers and accuracy before/after."""
    from deepfleet.train.demo import evaluate_base_model, evaluate_saved_model, training_loop_seconds

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    console = Console(highlight=False)
    local = resolve_fleet(fleet_file=None, hostfile=None, environ={}, cwd=DEMO_RECIPE.parent)
    prepared = prepare_training(load_recipe(DEMO_RECIPE, list(overrides or [])), local, nproc=nproc)
    recipe = prepared.recipe
    before = evaluate_base_model(recipe, n=heldout)
    console.print(f"before training: exact match {before.accuracy:.0%} on {heldout} held-out prompts")
    console.print(f"training {recipe.model.name} on {nproc} local ranks ...")
    seconds = run_training(with_prepared_data(prepared))
    after = evaluate_saved_model(recipe.output_path / "final", n=heldout)
    table = Table(title="held-out prompts (never seen in training)")
    for column in ("prompt", "expected", "before", "after"):
        table.add_column(column)
    for old, new in list(zip(before.results, after.results))[:12]:
        mark = "[green]✓[/green]" if new.correct else "[red]✗[/red]"
        table.add_row(new.prompt, new.expected, _one_line(old.answer), f"{_one_line(new.answer)} {mark}")
    console.print(table)
    console.print(f"exact match before: {before.accuracy:.0%}   after: {after.accuracy:.0%}   "
                  f"({heldout} held-out prompts; training took {seconds:.0f} s wall, "
                  f"{training_loop_seconds(recipe.output_path):.0f} s in the training loop)")
