"""Head-side preparation of a training run, the same for this machine alone and for a fleet:
resolve `deepspeed: auto` once, check everything checkable before any rank starts, and build the
job every host runs. Nothing here writes anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from deepfleet import hardware
from deepfleet.fleet.inventory import Fleet
from deepfleet.launch.training import (TrainingJob, cpu_threads_per_rank, fleet_world_size, is_local_only,
                                       training_fleet)
from deepfleet.plan.choose import FleetShape
from deepfleet.plan.deepspeed_config import planning_steps, resolve_run_config
from deepfleet.plan.memory import ModelShape, model_shape_from_config
from deepfleet.plan.recipe import Recipe


@dataclass(frozen=True, kw_only=True)
class PreparedRun:
    recipe: Recipe          # what the ranks get: `deepspeed: auto` resolved
    job: TrainingJob
    note: str = ""          # the planner's choice for `deepspeed: auto`, or ""

    @property
    def world_size(self) -> int:
        return fleet_world_size(self.job.fleet, self.job.nproc_per_node)

    @property
    def local(self) -> bool:
        return is_local_only(self.job.fleet)


def shape_for(recipe: Recipe) -> ModelShape:
    from deepfleet.train.model import load_model_config

    return model_shape_from_config(load_model_config(recipe.model), method=recipe.method, lora_rank=recipe.lora.r,
                                   lora_targets=recipe.lora.target_modules)


def resolved_recipe_json(recipe: Recipe) -> str:
    """The recipe the ranks load: overrides applied, output_dir absolute, env left to the environment."""
    data = recipe.model_dump(mode="json", exclude={"env"})
    data["output_dir"] = str(recipe.output_path.resolve())
    return json.dumps(data, indent=2) + "\n"


def resolve_auto_zero(recipe: Recipe, *, nproc: int, nodes: int = 1) -> tuple[Recipe, str]:
    """`deepspeed: auto`: the planner picks stage, offload and micro batch once, here, so every rank agrees.
    The head's accelerators stand for the fleet's: doctor checks that every host matches."""
    if recipe.deepspeed.zero != "auto" or recipe.deepspeed.config is not None:
        return recipe, ""
    host_memory = hardware.host_memory_bytes()
    gpus = hardware.gpu_count() > 0
    fleet = FleetShape(nodes=nodes, ranks_per_node=nproc, accelerator="cuda" if gpus else "cpu",
                       device_memory_bytes=hardware.gpu_memory_bytes() if gpus else host_memory,
                       host_memory_bytes=host_memory, bf16_supported=hardware.gpu_bf16_supported())
    choice = resolve_run_config(recipe, world_size=nodes * nproc, total_steps=planning_steps(recipe),
                                accelerator=fleet.accelerator, bf16_supported=fleet.bf16_supported,
                                model_shape=shape_for(recipe), fleet=fleet).plan.choice
    deepspeed = recipe.deepspeed.model_copy(update={
        "zero": choice.stage,
        "offload_optimizer": "cpu" if choice.offload.startswith("optimizer") else "none",
        "offload_params": "cpu" if choice.offload.endswith("params") else "none"})
    train = recipe.train.model_copy(update={"micro_batch": choice.micro_batch})
    note = (f"deepspeed: auto -> ZeRO-{choice.stage}, offload {choice.offload}, micro batch {choice.micro_batch} "
            f"x accumulation {choice.grad_accum}: {choice.reason}")
    return recipe.model_copy(update={"deepspeed": deepspeed, "train": train}), note


def estimated_checkpoint_bytes(recipe: Recipe, *, gpus: int) -> int | None:
    """Size of one checkpoint when checkpoints are on (from the model config on the meta device)."""
    if not (recipe.checkpoint.every_steps or recipe.checkpoint.every_minutes):
        return None
    from deepfleet.train.preflight import checkpoint_bytes

    shape = shape_for(recipe)
    precision_bytes = 2 if gpus and recipe.precision != "fp32" else 4
    return checkpoint_bytes(total_params=shape.total_params, trainable_params=shape.trainable_params,
                            precision_bytes=precision_bytes)


def prepare_training(recipe: Recipe, fleet: Fleet, *, nproc: int | None) -> PreparedRun:
    """The run on `fleet` (this machine alone: `nproc` ranks, default one per GPU or 2 CPU ranks),
    checked before launch; a DeepfleetError lists every problem found."""
    from deepfleet.train.preflight import check_before_launch

    gpus = hardware.gpu_count()
    local = is_local_only(fleet)
    fleet = training_fleet(fleet, nproc=nproc, gpus=gpus)
    nproc_per_node = None if local else nproc
    per_node = nproc_per_node or fleet.hosts[0].slots
    recipe, note = resolve_auto_zero(recipe, nproc=per_node, nodes=len(fleet.hosts))
    check_before_launch(recipe, world_size=fleet_world_size(fleet, nproc_per_node),
                        accelerator="cuda" if gpus else "cpu", cuda_available=gpus > 0,
                        checkpoint_size=estimated_checkpoint_bytes(recipe, gpus=gpus))
    threads = None if gpus else cpu_threads_per_rank(cpu_count=os.cpu_count() or 1, nproc=per_node)
    job = TrainingJob(fleet=fleet, recipe_json=resolved_recipe_json(recipe), recipe_env=dict(recipe.env),
                      output_dir=recipe.output_path, nproc_per_node=nproc_per_node, cpu_threads=threads)
    return PreparedRun(recipe=recipe, job=job, note=note)
