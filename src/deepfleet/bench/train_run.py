"""`deepfleet bench train RECIPE --nodes 1,2,...`: the recipe trained on the first N hosts, for each N.

Each count gets its own output dir (<output_dir>/bench-nodes-N), a short max_steps, no resume and no
checkpoints, then its metrics.jsonl is read back on the head (rank 0 runs on the first host, which
is the head's machine or shares its filesystem path; see `metrics_path`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deepfleet.bench.scaling import NodeResult, summarize, with_efficiency
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, with_hosts
from deepfleet.fleet_hardware import fleet_hardware
from deepfleet.launch.training import TrainingJob, run_training_job
from deepfleet.plan.recipe import Recipe
from deepfleet.train.metrics import METRICS_FILE, read_metrics


@dataclass(frozen=True, kw_only=True)
class ScalingOptions:
    node_counts: list[int]
    steps: int = 20
    warmup_steps: int = 3
    nproc_per_node: int | None = None
    hang_timeout: float = 120.0


def recipe_for_count(recipe: Recipe, nodes: int, steps: int) -> Recipe:
    output = recipe.output_path.resolve() / f"bench-nodes-{nodes}"
    train = recipe.train.model_copy(update={"max_steps": steps})
    checkpoint = recipe.checkpoint.model_copy(update={"every_steps": 0, "every_minutes": 0})
    logging = recipe.logging.model_copy(update={"every_steps": 1, "trackers": [], "tensorboard": None})
    return recipe.model_copy(update={"train": train, "checkpoint": checkpoint, "logging": logging,
                                     "output_dir": str(output), "resume": False})


def check_recipe(recipe: Recipe, options: ScalingOptions) -> None:
    if recipe.deepspeed.zero == "auto" and recipe.deepspeed.config is None:
        raise DeepfleetError("bench train compares node counts with one fixed DeepSpeed config",
                             where="deepspeed", fix="set deepspeed.zero to 0-3 (see `deepfleet plan` for a choice)")
    if options.steps <= options.warmup_steps:
        raise DeepfleetError(f"--steps {options.steps} leaves nothing after {options.warmup_steps} warm-up steps",
                             where="--steps", fix=f"use --steps > {options.warmup_steps}")


def run_scaling_benchmark(recipe: Recipe, fleet: Fleet, options: ScalingOptions, *,
                          write: Callable[[str], None] = print) -> list[NodeResult]:
    check_recipe(recipe, options)
    found = fleet_hardware(fleet, nproc=options.nproc_per_node)
    results = []
    for nodes in options.node_counts:
        hosts = list(found.fleet.hosts[:nodes])
        part = with_hosts(found.fleet, hosts)
        ranks_per_host = hosts[0].slots or 1
        count_recipe = recipe_for_count(recipe, nodes, options.steps)
        write(f"--- {nodes} node(s): {', '.join(h.name for h in hosts)}; {options.steps} steps")
        recipe_json = json.dumps({**count_recipe.model_dump(mode="json", exclude={"env"})})
        job = TrainingJob(fleet=part, recipe_json=recipe_json, recipe_env=recipe.env,
                          output_dir=count_recipe.output_path, interface=found.interface,
                          cpu_threads=found.cpu_threads())
        code = run_training_job(job, max_restarts=0, hang_timeout=options.hang_timeout, all_logs=False,
                                write=write).exit_code
        if code != 0:
            raise DeepfleetError(f"training on {nodes} node(s) failed (exit {code})",
                                 where=str(count_recipe.output_path / "logs"), fix="read the host logs there")
        records = read_metrics(metrics_path(count_recipe))
        results.append(summarize(records, nodes=nodes, hosts=[h.name for h in hosts], ranks_per_host=ranks_per_host,
                                 warmup_steps=options.warmup_steps))
    return with_efficiency(results)


def metrics_path(recipe: Recipe) -> Path:
    path = recipe.output_path / METRICS_FILE
    if not path.is_file():
        raise DeepfleetError(f"no {METRICS_FILE} where rank 0 wrote it", where=str(path),
                             fix="run bench train from the first host of the fleet (rank 0 writes metrics there)")
    return path

