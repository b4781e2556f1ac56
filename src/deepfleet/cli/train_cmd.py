"""`deepfleet train`, `deepfleet generate` and `deepfleet demo`: local training through torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet import hardware
from deepfleet.errors import EXIT_BAD_INPUT, DeepfleetError
from deepfleet.launch.local import (LocalLaunch, cpu_threads_per_rank, create_run_dir, default_nproc,
                                    local_torchrun_command, new_run_dir, render_command, run_local)
from deepfleet.plan.recipe import Recipe
from deepfleet.plan.recipe_io import load_recipe

DEMO_RECIPE = Path(str(resources.files("deepfleet") / "assets" / "demo.yaml"))   # shipped in the package
TRAIN_LOG_FILE = "train.log"


def _split_recipe_argument(recipe: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`deepfleet train train.max_steps=5` (no recipe file): the first argument is an override."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, overrides


def prepare_local_training(recipe: Recipe, *, nproc: Optional[int]) -> tuple[Recipe, LocalLaunch, str]:
    """Resolve `deepspeed: auto`, check everything checkable without ranks, say how they will run.

    Returns the recipe the ranks get, the launch, and a note on the planner's choice ("" if none). Writes nothing.
    """
    from deepfleet.train.preflight import check_before_launch

    gpus = hardware.gpu_count()
    nproc = nproc or default_nproc(gpus=gpus)
    recipe, note = resolve_auto_zero(recipe, nproc=nproc)
    check_before_launch(recipe, world_size=nproc, accelerator="cuda" if gpus else "cpu", cuda_available=gpus > 0,
                        checkpoint_size=estimated_checkpoint_bytes(recipe, gpus=gpus))
    threads = None if gpus else cpu_threads_per_rank(cpu_count=os.cpu_count() or 1, nproc=nproc)
    launch = LocalLaunch(nproc=nproc, run_dir=new_run_dir(recipe.output_path), cpu_threads=threads,
                         extra_env=dict(recipe.env))
    return recipe, launch, note


def estimated_checkpoint_bytes(recipe: Recipe, *, gpus: int) -> Optional[int]:
    """Size of one checkpoint when checkpoints are on (from the model config on the meta device)."""
    if not (recipe.checkpoint.every_steps or recipe.checkpoint.every_minutes):
        return None
    from deepfleet.cli.plan_cmd import shape_for
    from deepfleet.train.preflight import checkpoint_bytes

    shape = shape_for(recipe)
    precision_bytes = 2 if gpus and recipe.precision != "fp32" else 4
    return checkpoint_bytes(total_params=shape.total_params, trainable_params=shape.trainable_params,
                            precision_bytes=precision_bytes)


def resolve_auto_zero(recipe: Recipe, *, nproc: int, nodes: int = 1) -> tuple[Recipe, str]:
    """`deepspeed: auto`: the planner picks stage, offload and micro batch once, here, so every rank agrees."""
    if recipe.deepspeed.zero != "auto" or recipe.deepspeed.config is not None:
        return recipe, ""
    from deepfleet.cli.plan_cmd import shape_for
    from deepfleet.plan.choose import FleetShape
    from deepfleet.plan.deepspeed_config import planning_steps, resolve_run_config

    host_memory = hardware.host_memory_bytes()
    gpus = hardware.gpu_count() > 0
    fleet = FleetShape(nodes=nodes, ranks_per_node=nproc, accelerator="cuda" if gpus else "cpu",
                       device_memory_bytes=hardware.gpu_memory_bytes() if gpus else host_memory,
                       host_memory_bytes=host_memory, bf16_supported=hardware.gpu_bf16_supported())
    choice = resolve_run_config(recipe, world_size=nodes * nproc, total_steps=planning_steps(recipe),
                                accelerator=fleet.accelerator,
                                bf16_supported=fleet.bf16_supported, model_shape=shape_for(recipe),
                                fleet=fleet).plan.choice
    deepspeed = recipe.deepspeed.model_copy(update={
        "zero": choice.stage,
        "offload_optimizer": "cpu" if choice.offload.startswith("optimizer") else "none",
        "offload_params": "cpu" if choice.offload.endswith("params") else "none"})
    train = recipe.train.model_copy(update={"micro_batch": choice.micro_batch})
    note = (f"deepspeed: auto -> ZeRO-{choice.stage}, offload {choice.offload}, micro batch {choice.micro_batch} "
            f"x accumulation {choice.grad_accum}: {choice.reason}")
    return recipe.model_copy(update={"deepspeed": deepspeed, "train": train}), note


def resolved_recipe_json(recipe: Recipe) -> str:
    """The recipe the ranks load: overrides applied, output_dir absolute, env left to the environment."""
    data = recipe.model_dump(mode="json", exclude={"env"})
    data["output_dir"] = str(recipe.output_path.resolve())
    return json.dumps(data, indent=2) + "\n"


def launch_local_training(recipe: Recipe, launch: LocalLaunch) -> float:
    """Run the ranks; on success keep the log as output_dir/train.log. Returns wall seconds."""
    create_run_dir(launch.run_dir)
    launch.recipe_file.write_text(resolved_recipe_json(recipe))
    output_existed = recipe.output_path.exists()
    started = time.perf_counter()
    try:
        run_local(launch)
    except DeepfleetError as exc:
        if exc.exit_code == EXIT_BAD_INPUT and not output_existed and recipe.output_path.is_dir():
            with contextlib.suppress(OSError):
                recipe.output_path.rmdir()      # only if the ranks left it empty
        raise
    seconds = time.perf_counter() - started
    shutil.copyfile(launch.log_file, recipe.output_path / TRAIN_LOG_FILE)
    shutil.rmtree(launch.run_dir, ignore_errors=True)
    return seconds


def _train_on_fleet(recipe: Recipe, fleet_file: Optional[str], hostfile: Optional[str], *, nproc: Optional[int],
                    max_restarts: int, hang_timeout: float, all_logs: bool, dry_run: bool) -> int:
    from deepfleet.fleet.sources import resolve_fleet
    from deepfleet.launch.training import fleet_world_size, train_on_fleet
    from deepfleet.train.preflight import check_before_launch

    fleet = resolve_fleet(fleet_file=fleet_file, hostfile=hostfile)
    # The head's accelerators stand for the fleet's: doctor checks that every host matches.

    gpus = hardware.gpu_count()
    per_node = nproc or fleet.hosts[0].slots
    recipe, note = resolve_auto_zero(recipe, nproc=per_node, nodes=len(fleet.hosts))
    if note:
        print(note)
    check_before_launch(recipe, world_size=fleet_world_size(fleet, nproc), accelerator="cuda" if gpus else "cpu",
                        cuda_available=gpus > 0, checkpoint_size=estimated_checkpoint_bytes(recipe, gpus=gpus))
    threads = None if gpus else cpu_threads_per_rank(cpu_count=os.cpu_count() or 1, nproc=per_node)
    return train_on_fleet(fleet, recipe_json=resolved_recipe_json(recipe), recipe_env=recipe.env,
                          output_dir=recipe.output_path, nproc_per_node=nproc, cpu_threads=threads,
                          max_restarts=max_restarts, hang_timeout=hang_timeout, all_logs=all_logs, dry_run=dry_run)


def _one_line(answer: str, width: int = 24) -> str:
    return answer.replace("\n", "⏎")[:width]


def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (omit for the built-in demo recipe defaults)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Ranks on this machine (default: GPUs, else 2 CPU ranks)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the torchrun command and environment; run nothing"),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over even when output_dir has checkpoints"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml: train on every host of it"),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile: train on every host of it"),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="With a fleet: relaunch after a failure"),
    hang_timeout: float = typer.Option(60.0, "--hang-timeout", min=1, help="With a fleet: seconds without progress"),
    all_logs: bool = typer.Option(False, "--all-logs", help="With a fleet: stream every rank, not only rank 0"),
) -> None:
    """Train with torchrun, locally or (--fleet/--hostfile) on every host; saves an HF model to output_dir/final.

    Resumes from the newest complete checkpoint in output_dir. Exit code 75: stopped by a signal
    after writing a checkpoint; run the same command again to resume.
    """
    recipe_path, override_list = _split_recipe_argument(recipe, overrides)
    override_list += ["resume=false"] if no_resume else []
    loaded = load_recipe(recipe_path, override_list)
    if fleet or hostfile:
        raise typer.Exit(_train_on_fleet(loaded, fleet, hostfile, nproc=nproc, max_restarts=max_restarts,
                                         hang_timeout=hang_timeout, all_logs=all_logs, dry_run=dry_run))
    loaded, launch, note = prepare_local_training(loaded, nproc=nproc)
    if note:
        print(f"# {note}")
    if dry_run:
        print(render_command(*local_torchrun_command(launch)))
        return
    seconds = launch_local_training(loaded, launch)
    print(f"done in {seconds:.0f} s: {loaded.output_path / 'final'}")


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
    recipe = load_recipe(DEMO_RECIPE, list(overrides or []))
    console = Console(highlight=False)
    recipe, launch, _ = prepare_local_training(recipe, nproc=nproc)
    before = evaluate_base_model(recipe, n=heldout)
    console.print(f"before training: exact match {before.accuracy:.0%} on {heldout} held-out prompts")
    console.print(f"training {recipe.model.name} on {nproc} local ranks ...")
    seconds = launch_local_training(recipe, launch)
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
