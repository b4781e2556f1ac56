"""`deepfleet plan` (memory table, choice, DeepSpeed JSON, commands) and `deepfleet check-ds-config`.

The edge of the planner: this module reads the recipe, the model config, the fleet and the local
hardware, and hands plain values to `plan/`, which decides.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import typer
from rich.console import Console

from deepfleet.errors import DeepfleetError
from deepfleet.plan.choose import Plan
from deepfleet.plan.deepspeed_config import check_deepspeed_json, planning_steps
from deepfleet.plan.deepspeed_json import read_deepspeed_json
from deepfleet.plan.memory import ModelShape
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.plan.render import render_plan
from deepfleet.prepare import build_plan, planned_hardware


FactsOpt = typer.Option(None, "--facts", help="Plan from a `deepfleet doctor --record` file instead of asking "
                                             "the hosts over ssh")


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
            "rows": [{"stage": r.stage, "offload": r.offload, "model_states_bytes": r.states.device_bytes,
                      "rank_bytes": r.rank_bytes, "host_bytes": r.host_bytes,
                      "fits": r.fits} for r in plan.rows]}


def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.micro_batch=8"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml or hostfile to plan for"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="Memory per GPU, e.g. 80GiB (default: the hosts' own)"),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="CPU memory per host, e.g. 512GiB"),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Hosts (instead of --fleet)"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="Ranks per host"),
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", min=0.001, help="Measured inter-host bandwidth, Gbit/s"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Whether the GPUs support bf16"),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
    facts: Optional[str] = FactsOpt,
) -> None:
    """Memory per ZeRO stage and offload, the fastest setting that fits, its DeepSpeed JSON and the commands."""
    report = build_plan(load_recipe(recipe, list(overrides or [])), fleet, nodes=nodes, gpus_per_node=gpus_per_node,
                        gpu_mem=gpu_mem, host_mem=host_mem, link_gbps=link_gbps, bf16=bf16, facts_file=facts)
    resolved = report.resolved
    if as_json:
        print(json.dumps({**_summary(resolved.plan.shape, resolved.plan), "summary": report.summary,
                          "deepspeed_config": resolved.config,
                          "config_source": resolved.source, "notes": list(resolved.notes),
                          "commands": report.commands}, indent=2))
        return
    render_plan(Console(highlight=False, width=None if os.isatty(1) else 140), report.recipe, resolved,
                report.commands, report.summary)


def check_ds_config(
    file: str = typer.Argument(..., help="DeepSpeed JSON config"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe the config is for ('auto' filled from it)"),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="fleet.yaml or hostfile (default: as `plan` finds it)"),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Hosts (instead of --fleet)"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="Ranks per host"),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", help="cuda or cpu (default: this machine)"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Whether the hardware supports bf16"),
    facts: Optional[str] = FactsOpt,
) -> None:
    """Check a DeepSpeed JSON: unknown keys, batch arithmetic, precision, offload; fill and report "auto"."""
    loaded = load_recipe(recipe) if recipe else None
    if accelerator not in (None, "cuda", "cpu"):
        raise DeepfleetError(f"unknown accelerator {accelerator!r}", where="--accelerator", fix="use cuda or cpu")
    found, _ = planned_hardware(fleet, nodes=nodes, gpus_per_node=gpus_per_node, facts_file=facts)
    accelerator = accelerator or found.accelerator
    if bf16 is None:  # a cuda check on CPU hosts assumes GPUs with bf16 (pass --no-bf16 for older ones)
        bf16 = accelerator == "cuda" and (found.accelerator == "cpu" or all(h.bf16 for h in found.hosts))
    from deepfleet.train.model_facts import model_facts
    hidden = model_facts(loaded).shape.hidden_size if loaded else None
    world_size = found.world_size
    checked = check_deepspeed_json(read_deepspeed_json(file), source=file, recipe=loaded,
                                   world_size=world_size, accelerator=accelerator, bf16_supported=bf16,
                                   total_steps=planning_steps(loaded) if loaded else 0, hidden_size=hidden)
    for note in checked.notes:
        print(f"note: {note}")
    print(json.dumps(checked.config, indent=2))
    print(f"ok: {file} is valid for {world_size} rank(s) on {accelerator}")
