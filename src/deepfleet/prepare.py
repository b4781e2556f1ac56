"""Head-side preparation of a training run, the same for this machine alone and for a fleet:
resolve `deepspeed: auto` once, check everything checkable before any rank starts, and build the
job every host runs. Nothing here writes anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from deepfleet import hardware
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.sources import local_host, resolve_fleet
from deepfleet.launch.training import (TrainingJob, cpu_threads_per_rank, default_nproc, fleet_world_size,
                                       is_local_only, render_training_plan, training_fleet)
from deepfleet.plan.choose import FleetShape
from deepfleet.plan.deepspeed_config import ResolvedDeepSpeedConfig, planning_steps, resolve_run_config
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


GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory_size(text: str, option: str) -> int:
    """'80GiB', '80GB', '80G' (G = GiB, as GPU vendors mean it) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise DeepfleetError(f"cannot read memory size {text!r}", where=option, fix="write it like 80GiB or 24GB")
    return int(float(match.group(1)) * _UNITS[unit])


def planned_fleet(fleet_file: str | None, nodes: int | None, gpus_per_node: int | None,
                  local_gpus: int) -> tuple[Fleet, bool]:
    """The fleet to plan for, and whether it is this machine alone: --nodes/--gpus-per-node describe
    hosts not named yet (node1..nodeN); else the fleet deepfleet finds (--fleet, ./fleet.yaml, SLURM,
    PBS); else this machine, with one rank per GPU or 2 CPU ranks."""
    if fleet_file and nodes:
        raise DeepfleetError("both --fleet and --nodes given", where="command line",
                             fix="plan for the fleet file, or for --nodes/--gpus-per-node, not both")
    if nodes or gpus_per_node:
        ranks = gpus_per_node or default_nproc(gpus=local_gpus)
        hosts = ((local_host(slots=ranks),) if (nodes or 1) == 1 else
                 tuple(Host(name=f"node{i}", address=f"node{i}", slots=ranks) for i in range(1, nodes + 1)))
        return Fleet(hosts=hosts, source="--nodes/--gpus-per-node"), False
    is_yaml = fleet_file is not None and fleet_file.lower().endswith((".yaml", ".yml"))
    fleet = resolve_fleet(fleet_file=fleet_file if is_yaml else None, hostfile=None if is_yaml else fleet_file)
    if is_local_only(fleet):
        return training_fleet(fleet, nproc=None, gpus=local_gpus), True
    slots = {host.slots for host in fleet.hosts}
    if len(slots) > 1:
        raise DeepfleetError(f"hosts have different slot counts {sorted(slots)}", where=fleet.source,
                             fix="plan for equal hosts: give every host the same slots")
    return fleet, False


def fleet_shape(fleet: Fleet, *, local_only: bool, gpu_mem: str | None, host_mem: str | None,
                link_gbps: float | None, bf16: bool | None) -> FleetShape:
    """The fleet's memory and precision: options first, else this machine (GPUs, or CPU ranks in host RAM)."""
    node_count, ranks = len(fleet.hosts), fleet.hosts[0].slots
    host_bytes = (parse_memory_size(host_mem, "--host-mem") if host_mem
                  else (hardware.host_memory_bytes() if local_only else None))
    if gpu_mem:
        device_bytes, accelerator = parse_memory_size(gpu_mem, "--gpu-mem"), "cuda"
        bf16_ok = True if bf16 is None else bf16
    elif hardware.gpu_count():
        device_bytes, accelerator = hardware.gpu_memory_bytes(), "cuda"
        bf16_ok = hardware.gpu_bf16_supported() if bf16 is None else bf16
    elif not local_only:
        raise DeepfleetError("no GPU here to measure, and the fleet's GPU memory is unknown", where="--gpu-mem",
                             fix="pass --gpu-mem (e.g. --gpu-mem 80GiB) and --host-mem for the fleet's hosts")
    else:
        device_bytes, accelerator, bf16_ok = host_bytes or hardware.host_memory_bytes(), "cpu", False
    return FleetShape(nodes=node_count, ranks_per_node=ranks, accelerator=accelerator,
                      device_memory_bytes=device_bytes, host_memory_bytes=host_bytes, bf16_supported=bf16_ok,
                      inter_host_gbps=link_gbps)


def train_commands(recipe: Recipe, fleet: Fleet, shape: FleetShape) -> list[str]:
    """What `deepfleet train` would run on each host, from the launcher's own builders."""
    threads = cpu_threads_per_rank(cpu_count=os.cpu_count() or 1, nproc=shape.ranks_per_node) \
        if shape.accelerator == "cpu" else None
    job = TrainingJob(fleet=fleet, recipe_json=resolved_recipe_json(recipe), recipe_env=dict(recipe.env),
                      output_dir=recipe.output_path, cpu_threads=threads)
    return render_training_plan(job, probe=False).splitlines()


@dataclass(frozen=True)
class PlanReport:
    recipe: Recipe
    resolved: ResolvedDeepSpeedConfig   # .plan (memory rows, choice), .config (the DeepSpeed JSON)
    commands: list[str]                 # what `deepfleet train` would run on each host

    @property
    def deepspeed_config(self) -> dict:
        return self.resolved.config

    def table(self) -> str:
        """The report `deepfleet plan` prints: memory table, choice, DeepSpeed config, commands."""
        import io

        from rich.console import Console

        from deepfleet.plan.render import render_plan

        out = io.StringIO()
        render_plan(Console(file=out, width=140, highlight=False), self.recipe, self.resolved, self.commands)
        return out.getvalue()


def build_plan(recipe: Recipe, fleet_file: str | None = None, *, nodes: int | None = None,
               gpus_per_node: int | None = None, gpu_mem: str | None = None, host_mem: str | None = None,
               link_gbps: float | None = None, bf16: bool | None = None,
               prebuilt_ops: frozenset[str] = frozenset()) -> PlanReport:
    """Memory per ZeRO stage and offload, the chosen setting, its DeepSpeed config and the commands, for
    `fleet_file` (None: the fleet deepfleet finds) or for `nodes` x `gpus_per_node`. `prebuilt_ops`: the
    DeepSpeed ops prebuilt on every host (`deepfleet doctor` lists them); the ranks read their own."""
    planned, local_only = planned_fleet(fleet_file, nodes, gpus_per_node, hardware.gpu_count())
    shape = fleet_shape(planned, local_only=local_only, gpu_mem=gpu_mem, host_mem=host_mem, link_gbps=link_gbps,
                        bf16=bf16)
    resolved = resolve_run_config(recipe, world_size=shape.world_size, total_steps=planning_steps(recipe),
                                  accelerator=shape.accelerator, bf16_supported=shape.bf16_supported,
                                  model_shape=shape_for(recipe), fleet=shape, prebuilt_ops=prebuilt_ops)
    return PlanReport(recipe=recipe, resolved=resolved, commands=train_commands(recipe, planned, shape))
