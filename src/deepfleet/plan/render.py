"""The plan as `deepfleet plan` shows it: the memory table, the choice, the DeepSpeed config, the commands."""

from __future__ import annotations

import json
from typing import Optional

from rich.console import Console
from rich.table import Table

from deepfleet.plan.choose import Plan, PlanRow
from deepfleet.plan.deepspeed_config import ResolvedDeepSpeedConfig
from deepfleet.plan.memory import OFFLOADS, STAGES, uses_chunked_loss
from deepfleet.plan.recipe import Recipe

GiB = 2**30


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


def optimizer_description(config: dict) -> str:
    """Which optimizer DeepSpeed will build from a config, and whether it needs a compiled op."""
    optimizer = config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    offload = ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        return f"DeepSpeedCPUAdam (optimizer offloaded to {offload}; DeepSpeed op cpu_adam, built at first use)"
    if params.get("torch_adam"):
        return "torch AdamW" + (" (fused)" if params.get("fused") else "") + " through DeepSpeed (nothing to build)"
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        return "DeepSpeed FusedAdam (DeepSpeed op fused_adam, built at first use unless prebuilt)"
    return str(optimizer.get("type") or "none (the model's own)")


def render_plan(console: Console, recipe: Recipe, resolved: ResolvedDeepSpeedConfig, commands: list[str],
                summary: list[str] = ()) -> None:
    plan, shape = resolved.plan, resolved.plan.shape
    for line in summary:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"model {recipe.model.name}: {shape.total_params / 1e9:.3f}B parameters, "
                  f"{shape.trainable_params / 1e9:.3f}B trainable ({recipe.method}), "
                  f"largest layer {shape.largest_layer_params / 1e6:.1f}M")
    acts = plan.activations
    console.print(f"activations per rank at micro batch {plan.choice.micro_batch} x {recipe.data.max_length} tokens: "
                  f"{_size(acts.without_checkpointing)}, {_size(acts.with_checkpointing)} with gradient "
                  f"checkpointing ({'on' if recipe.train.gradient_checkpointing else 'off'}); the loss counted as "
                  + ("chunked cross-entropy (one chunk of logits at a time)"
                     if uses_chunked_loss(recipe.train.chunked_loss, plan.fleet.accelerator)
                     else "plain cross-entropy (all logits)"))
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
