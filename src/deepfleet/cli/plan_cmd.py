"""`deepfleet plan` (memory table, choice, DeepSpeed JSON, commands) and `deepfleet check-ds-config`.

The edge of the planner: this module reads the recipe, the model config, the fleet and the local
hardware, and hands plain values to `plan/`, which decides.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet import hardware
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.sources import local_host, resolve_fleet
from deepfleet.launch.training import (TrainingJob, cpu_threads_per_rank, default_nproc, is_local_only,
                                       render_training_plan, training_fleet)
from deepfleet.plan.choose import FleetShape, Plan, PlanRow
from deepfleet.plan.deepspeed_config import (ResolvedDeepSpeedConfig, check_deepspeed_json, planning_steps,
                                             resolve_run_config)
from deepfleet.plan.deepspeed_user_config import read_deepspeed_json
from deepfleet.plan.memory import OFFLOADS, STAGES, ModelShape
from deepfleet.plan.recipe import Recipe
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.prepare import resolved_recipe_json, shape_for

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


def planned_fleet(fleet_file: Optional[str], nodes: Optional[int], gpus_per_node: Optional[int],
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


def fleet_shape(fleet: Fleet, *, local_only: bool, gpu_mem: Optional[str], host_mem: Optional[str],
                link_gbps: Optional[float], bf16: Optional[bool]) -> FleetShape:
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


def _gib(value: int) -> str:
    return f"{value / GiB:.1f}"


def _size(value: int) -> str:
    """Bytes for a table cell: GiB, or MiB for small models."""
    return f"{value / GiB:.1f}G" if value >= GiB else f"{value / 2**20:.0f}M"


def memory_table(plan: Plan) -> Table:
    cpu = plan.fleet.accelerator == "cpu"
    table = Table(title=f"memory per rank ({'host RAM, CPU ranks' if cpu else 'GPU'}) and per host")
    for column in ("ZeRO", "offload", "params", "grads", "optim+master", "activations", "buffers",
                   "rank", "host", "fits"):
        table.add_column(column, justify="right" if column not in ("offload", "fits") else "left")
    rows = {(row.stage, row.offload): row for row in plan.rows}
    for stage in STAGES:
        for offload in OFFLOADS:
            row: Optional[PlanRow] = rows.get((stage, offload))
            if row is None:
                continue
            chosen = (stage, offload) == (plan.choice.stage, plan.choice.offload)
            s = row.states
            fits = ("[bold green]chosen[/]" if chosen else "yes") if row.fits else f"[red]no ({row.limit})[/]"
            table.add_row(str(stage), offload, _size(s.params + s.largest_layer), _size(s.gradients),
                          _size(s.optimizer_states + s.master_params), _size(row.activation_bytes),
                          _size(row.buffer_bytes), _size(row.rank_bytes), _size(row.host_bytes), fits)
    return table


def train_commands(recipe: Recipe, fleet: Fleet, shape: FleetShape) -> list[str]:
    """What `deepfleet train` would run on each host, from the launcher's own builders."""
    threads = cpu_threads_per_rank(cpu_count=os.cpu_count() or 1, nproc=shape.ranks_per_node) \
        if shape.accelerator == "cpu" else None
    job = TrainingJob(fleet=fleet, recipe_json=resolved_recipe_json(recipe), recipe_env=dict(recipe.env),
                      output_dir=recipe.output_path, cpu_threads=threads)
    return render_training_plan(job, probe=False).splitlines()


def _summary(shape: ModelShape, plan: Plan) -> dict[str, Any]:
    return {"total_params": shape.total_params, "trainable_params": shape.trainable_params,
            "largest_layer_params": shape.largest_layer_params,
            "activations_bytes": {"without_checkpointing": plan.activations.without_checkpointing,
                                  "with_checkpointing": plan.activations.with_checkpointing},
            "fleet": {"nodes": plan.fleet.nodes, "ranks_per_node": plan.fleet.ranks_per_node,
                      "accelerator": plan.fleet.accelerator, "device_memory_bytes": plan.fleet.device_memory_bytes},
            "choice": {"stage": plan.choice.stage, "offload": plan.choice.offload,
                       "micro_batch": plan.choice.micro_batch, "grad_accum": plan.choice.grad_accum,
                       "reason": plan.choice.reason, "warnings": list(plan.choice.warnings)},
            "rows": [{"stage": r.stage, "offload": r.offload, "rank_bytes": r.rank_bytes, "host_bytes": r.host_bytes,
                      "fits": r.fits} for r in plan.rows]}


def render_plan(console: Console, recipe: Recipe, resolved: ResolvedDeepSpeedConfig, commands: list[str]) -> None:
    plan, shape = resolved.plan, resolved.plan.shape
    console.print(f"model {recipe.model.name}: {shape.total_params / 1e9:.3f}B parameters, "
                  f"{shape.trainable_params / 1e9:.3f}B trainable ({recipe.method}), "
                  f"largest layer {shape.largest_layer_params / 1e6:.1f}M")
    acts = plan.activations
    console.print(f"activations per rank at micro batch {plan.choice.micro_batch} x {recipe.data.max_length} tokens: "
                  f"{_size(acts.without_checkpointing)}, {_size(acts.with_checkpointing)} with gradient "
                  f"checkpointing ({'on' if recipe.train.gradient_checkpointing else 'off'})")
    console.print(memory_table(plan))
    choice = plan.choice
    console.print(f"[bold]choice[/]: ZeRO-{choice.stage}, offload {choice.offload}, micro batch {choice.micro_batch} "
                  f"x accumulation {choice.grad_accum} x {plan.fleet.world_size} ranks = {recipe.train.global_batch}")
    console.print(f"reason: {choice.reason}")
    for warning in choice.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    for note in resolved.notes:
        console.print(f"note: {note}")
    console.print(f"DeepSpeed config (from {resolved.source}; scheduler steps are computed from the data at launch):")
    console.print_json(json.dumps(resolved.config))
    console.print("commands `deepfleet train` would run:")
    for command in commands:
        console.print(command, markup=False, highlight=False, soft_wrap=True)


def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.micro_batch=8"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml or hostfile to plan for"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="Memory per GPU, e.g. 80GiB (default: this machine)"),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="CPU memory per host, e.g. 512GiB"),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Hosts (instead of --fleet)"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="Ranks per host"),
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", min=0.001, help="Measured inter-host bandwidth, Gbit/s"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Whether the GPUs support bf16"),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
) -> None:
    """Memory per ZeRO stage and offload, the fastest setting that fits, its DeepSpeed JSON and the commands."""
    loaded = load_recipe(recipe, list(overrides or []))
    shape = shape_for(loaded)
    planned, local_only = planned_fleet(fleet, nodes, gpus_per_node, hardware.gpu_count())
    shape_of_fleet = fleet_shape(planned, local_only=local_only, gpu_mem=gpu_mem, host_mem=host_mem,
                                 link_gbps=link_gbps, bf16=bf16)
    resolved = resolve_run_config(loaded, world_size=shape_of_fleet.world_size,
                                  total_steps=planning_steps(loaded),
                                  accelerator=shape_of_fleet.accelerator,
                                  bf16_supported=shape_of_fleet.bf16_supported, model_shape=shape,
                                  fleet=shape_of_fleet)
    commands = train_commands(loaded, planned, shape_of_fleet)
    if as_json:
        print(json.dumps({**_summary(shape, resolved.plan), "deepspeed_config": resolved.config,
                          "config_source": resolved.source, "notes": list(resolved.notes),
                          "commands": commands}, indent=2))
        return
    render_plan(Console(highlight=False, width=None if os.isatty(1) else 140), loaded, resolved, commands)


def check_ds_config(
    file: str = typer.Argument(..., help="DeepSpeed JSON config"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe the config is for ('auto' filled from it)"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml or hostfile (default: as `plan` finds it)"),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Hosts (instead of --fleet)"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="Ranks per host"),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", help="cuda or cpu (default: this machine)"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Whether the hardware supports bf16"),
) -> None:
    """Check a DeepSpeed JSON: unknown keys, batch arithmetic, precision, offload; fill and report "auto"."""

    loaded = load_recipe(recipe)
    local_gpus = hardware.gpu_count()
    accelerator = accelerator or ("cuda" if local_gpus else "cpu")
    if accelerator not in ("cuda", "cpu"):
        raise DeepfleetError(f"unknown accelerator {accelerator!r}", where="--accelerator", fix="use cuda or cpu")
    if bf16 is None:  # without a GPU here, a cuda check assumes GPUs with bf16 (pass --no-bf16 for older ones)
        bf16 = accelerator == "cuda" and (not local_gpus or hardware.gpu_bf16_supported())
    planned, _ = planned_fleet(fleet, nodes, gpus_per_node, local_gpus)
    node_count, ranks = len(planned.hosts), planned.hosts[0].slots
    from deepfleet.train.model import load_model_config

    hidden = load_model_config(loaded.model).hidden_size if recipe else None
    checked = check_deepspeed_json(read_deepspeed_json(file), source=file, recipe=loaded,
                                   world_size=node_count * ranks, accelerator=accelerator, bf16_supported=bf16,
                                   total_steps=planning_steps(loaded), hidden_size=hidden,
                                   recipe_given=recipe is not None)
    for note in checked.notes:
        print(f"note: {note}")
    print(json.dumps(checked.config, indent=2))
    print(f"ok: {file} is valid for {node_count * ranks} rank(s) on {accelerator}")
