"""Build the DeepSpeed config dict from a recipe (pure).

The batch identity DeepSpeed checks at start-up, train_batch_size = micro x accumulation x world,
is solved here so a wrong global batch is a one-line error before anything launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import Recipe

Precision = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def solve_batch_layout(*, global_batch: int, micro_batch: int, world_size: int) -> BatchLayout:
    """Gradient accumulation that makes micro x accumulation x world equal the global batch exactly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise DeepfleetError(
            f"train.global_batch {global_batch} is not micro_batch {micro_batch} x world size {world_size} "
            f"x an integer accumulation",
            where="train.global_batch",
            fix=f"use train.global_batch={lower} or {lower + per_step}, or change train.micro_batch",
        )
    return BatchLayout(micro_batch=micro_batch, grad_accum=global_batch // per_step, world_size=world_size)


def resolve_precision(requested: str, *, accelerator: str, bf16_supported: bool) -> Precision:
    """`auto` means bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if accelerator == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and accelerator != "cpu" and not bf16_supported:
        raise DeepfleetError("precision bf16 requested but this GPU has no bf16 support", where="precision",
                             fix="use precision: fp16 or auto")
    if requested in ("bf16", "fp16") and accelerator == "cpu":
        raise DeepfleetError(f"precision {requested} is not supported for training on CPU", where="precision",
                             fix="use precision: auto or fp32 on CPU")
    return requested  # type: ignore[return-value]


def _scheduler(recipe: Recipe, total_steps: int) -> dict[str, Any]:
    train = recipe.train
    warmup = int(train.warmup * total_steps) if train.warmup < 1 else int(train.warmup)
    warmup = min(warmup, max(total_steps - 1, 0))
    if train.schedule == "constant":
        return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                               "warmup_num_steps": warmup, "warmup_type": "linear"}}
    if train.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                                    "warmup_num_steps": warmup, "total_num_steps": total_steps,
                                                    "warmup_type": "linear"}}
    return {"type": "WarmupCosineLR", "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup,
                                                 "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0,
                                                 "warmup_type": "linear"}}


def _zero_section(recipe: Recipe, stage: int) -> dict[str, Any]:
    spec = recipe.deepspeed
    section: dict[str, Any] = {"stage": stage, "overlap_comm": stage > 0, "contiguous_gradients": stage > 0}
    if stage == 3:
        section["stage3_gather_16bit_weights_on_model_save"] = True
    for kind, device in (("offload_optimizer", spec.offload_optimizer), ("offload_param", spec.offload_params)):
        if device != "none":
            entry: dict[str, Any] = {"device": device, "pin_memory": True}
            if device == "nvme":
                entry["nvme_path"] = spec.nvme_path
            section[kind] = entry
    return section


def build_deepspeed_config(recipe: Recipe, *, stage: int, world_size: int, total_steps: int,
                           accelerator: str, bf16_supported: bool) -> dict[str, Any]:
    """The DeepSpeed config for a recipe on `world_size` ranks; `stage` is the resolved ZeRO stage."""
    layout = solve_batch_layout(global_batch=recipe.train.global_batch,
                                micro_batch=recipe.train.micro_batch, world_size=world_size)
    precision = resolve_precision(recipe.precision, accelerator=accelerator, bf16_supported=bf16_supported)
    train = recipe.train
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay,
            # DeepSpeed's fused Adam needs CUDA; plain torch AdamW runs everywhere without offload.
            **({"torch_adam": True} if accelerator == "cpu" and recipe.deepspeed.offload_optimizer == "none" else {}),
        }},
        "scheduler": _scheduler(recipe, total_steps),
        "zero_optimization": _zero_section(recipe, stage),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config


def deepspeed_config_for_run(recipe: Recipe, *, world_size: int, total_steps: int, accelerator: str,
                             bf16_supported: bool) -> dict[str, Any]:
    """The config a run uses: the recipe's explicit stage, the planner's choice, or the user's JSON."""
    spec = recipe.deepspeed
    if spec.config is not None or spec.zero == "auto":
        raise DeepfleetError("deepspeed: auto and deepspeed.config are not supported yet", where="deepspeed",
                             fix="set deepspeed.zero to 0, 1, 2 or 3")
    return build_deepspeed_config(recipe, stage=int(spec.zero), world_size=world_size, total_steps=total_steps,
                                  accelerator=accelerator, bf16_supported=bf16_supported)
