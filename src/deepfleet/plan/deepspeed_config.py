"""Build the DeepSpeed config dict from a recipe (pure).

The batch identity DeepSpeed checks at start-up, train_batch_size = micro x accumulation x world,
is solved here so a wrong global batch is a one-line error before anything launches. `deepspeed: auto`
takes the planner's choice (`plan/choose.py`); `deepspeed.config` takes the user's JSON, checked and
with every "auto" filled in (`plan/deepspeed_user_config.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.plan.choose import (BatchLayout, FleetShape, Plan, Workload, choose_zero_setting, plan_fixed_setting,
                                   solve_batch_layout)
from deepfleet.plan.deepspeed_json import parse_deepspeed_json, read_deepspeed_json
from deepfleet.plan.deepspeed_user_config import CheckedDeepSpeedConfig, ConfigContext, check_user_deepspeed_config
from deepfleet.plan.memory import ModelShape, Offload, model_shape_from_config
from deepfleet.plan.recipe import Recipe

Precision = Literal["bf16", "fp16", "fp32"]
__all__ = ["BatchLayout", "solve_batch_layout", "resolve_precision", "build_deepspeed_config", "optimizer_section",
           "deepspeed_config_for_run", "resolve_run_config", "ResolvedDeepSpeedConfig", "check_deepspeed_json"]


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


# Before the data is read the number of optimizer steps is unknown; previews and checks use this
# (it only shapes the scheduler section, never the ZeRO choice or the batch layout).
STEPS_WHEN_UNKNOWN = 1000


def planning_steps(recipe: Recipe) -> int:
    return recipe.train.max_steps or STEPS_WHEN_UNKNOWN


def _scheduler(recipe: Recipe, total_steps: int) -> dict[str, Any]:
    """The recipe's schedule as a DeepSpeed scheduler. Warmup rises linearly from 0 (a fraction of the
    steps rounded up, as transformers' warmup_ratio); with no warmup the first step has the full lr
    (DeepSpeed needs at least one warmup step, and counts at least two: that span is flat at the full lr).
    The training loop starts the scheduler at its first step (`start_warmup_at_its_first_step`)."""
    train = recipe.train
    warmup = math.ceil(train.warmup * total_steps) if train.warmup < 1 else int(train.warmup)
    start = 1.0 if warmup == 0 else 0.0
    warmup = max(1, min(warmup, total_steps - 1))
    if train.schedule == "constant":
        return {"type": "WarmupLR", "params": {"warmup_min_lr": start * train.lr, "warmup_max_lr": train.lr,
                                               "warmup_num_steps": warmup, "warmup_type": "linear"}}
    if train.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"warmup_min_lr": start * train.lr, "warmup_max_lr": train.lr,
                                                    "warmup_num_steps": warmup, "total_num_steps": total_steps,
                                                    "warmup_type": "linear"}}
    return {"type": "WarmupCosineLR", "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup,
                                                 "warmup_min_ratio": start, "cos_min_ratio": 0.0,
                                                 "warmup_type": "linear"}}


def _offload_setting(recipe: Recipe) -> Offload:
    spec = recipe.deepspeed
    if spec.offload_params != "none":
        return "optimizer+params"
    return "optimizer" if spec.offload_optimizer != "none" else "none"


def _offload_devices(recipe: Recipe, offload: Optional[Offload]) -> dict[str, str]:
    """Offload devices by DeepSpeed section: the recipe's own, or the planner's choice (on the recipe's
    device when it names one, else the CPU)."""
    spec = recipe.deepspeed
    if offload is None:
        return {"offload_optimizer": spec.offload_optimizer, "offload_param": spec.offload_params}
    optimizer = spec.offload_optimizer if spec.offload_optimizer != "none" else "cpu"
    params = spec.offload_params if spec.offload_params != "none" else "cpu"
    return {"offload_optimizer": optimizer if offload != "none" else "none",
            "offload_param": params if offload == "optimizer+params" else "none"}


def _check_offload(recipe: Recipe, stage: int, devices: dict[str, str]) -> None:
    problems = []
    if devices["offload_param"] != "none" and stage != 3:
        problems.append(Problem(what=f"offloading parameters needs ZeRO-3, but the stage is {stage}",
                                where="deepspeed.offload_params", fix="set deepspeed.zero: 3, or offload_params: none"))
    if "nvme" in devices.values() and not recipe.deepspeed.nvme_path:
        problems.append(Problem(what="offload to nvme without deepspeed.nvme_path", where="deepspeed.nvme_path",
                                fix="set deepspeed.nvme_path to a directory on a local NVMe drive"))
    if problems:
        raise DeepfleetError(problems=problems)


def _zero_section(recipe: Recipe, stage: int, devices: dict[str, str], hidden_size: Optional[int]) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": stage, "overlap_comm": stage > 0, "contiguous_gradients": stage > 0}
    if hidden_size and stage > 0:  # HF's sizes for "auto": buckets of hidden^2 elements
        section["reduce_bucket_size"] = hidden_size * hidden_size
        if stage < 3:
            section["allgather_bucket_size"] = hidden_size * hidden_size
    if stage == 3:
        section["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size:
            section["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            section["stage3_param_persistence_threshold"] = 10 * hidden_size
    for kind, device in devices.items():
        if device != "none":
            entry: dict[str, Any] = {"device": device, "pin_memory": True}
            if device == "nvme":
                entry["nvme_path"] = recipe.deepspeed.nvme_path
            section[kind] = entry
    return section


def adam_implementation(*, accelerator: str, offload_device: str, prebuilt_ops: frozenset[str]) -> dict[str, Any]:
    """The optimizer params that pick the AdamW implementation DeepSpeed builds, so that no op is compiled
    on a host unless the run needs it.

    `torch_adam` makes DeepSpeed build `torch.optim.AdamW(params, **optimizer.params)` and pass the
    remaining params through, so `fused: True` reaches torch: its single-kernel CUDA AdamW, the fastest
    torch path and built into the torch wheel. Without `torch_adam` DeepSpeed uses its FusedAdam, which
    JIT-compiles at first use (nvcc and CUDA_HOME on every host): only worth it when already prebuilt.
    """
    if offload_device != "none":
        # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam (op cpu_adam); doctor says if it can build.
        return {}
    if accelerator == "cpu":
        return {"torch_adam": True}
    if accelerator == "cuda" and "fused_adam" not in prebuilt_ops:
        return {"torch_adam": True, "fused": True}
    return {}


def optimizer_section(*, lr: float, weight_decay: float, accelerator: str, offload_device: str,
                      prebuilt_ops: frozenset[str] = frozenset()) -> dict[str, Any]:
    """AdamW with the recipe's lr and weight decay, in the implementation that needs no build."""
    return {"type": "AdamW", "params": {
        "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay,
        **adam_implementation(accelerator=accelerator, offload_device=offload_device, prebuilt_ops=prebuilt_ops)}}


def build_deepspeed_config(recipe: Recipe, *, stage: int, world_size: int, total_steps: int,
                           accelerator: str, bf16_supported: bool, offload: Optional[Offload] = None,
                           micro_batch: Optional[int] = None, hidden_size: Optional[int] = None,
                           prebuilt_ops: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The DeepSpeed config for a recipe on `world_size` ranks; `stage` is the resolved ZeRO stage.

    `offload` and `micro_batch` default to the recipe's; the planner passes its own choice. `prebuilt_ops`
    are the DeepSpeed ops compiled at install time on every host (none unless told)."""
    devices = _offload_devices(recipe, offload)
    _check_offload(recipe, stage, devices)
    layout = solve_batch_layout(global_batch=recipe.train.global_batch,
                                micro_batch=micro_batch or recipe.train.micro_batch, world_size=world_size)
    precision = resolve_precision(recipe.precision, accelerator=accelerator, bf16_supported=bf16_supported)
    train = recipe.train
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "optimizer": optimizer_section(lr=train.lr, weight_decay=train.weight_decay, accelerator=accelerator,
                                       offload_device=devices["offload_optimizer"], prebuilt_ops=prebuilt_ops),
        "scheduler": _scheduler(recipe, total_steps),
        "zero_optimization": _zero_section(recipe, stage, devices, hidden_size),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config


@dataclass(frozen=True, kw_only=True)
class ResolvedDeepSpeedConfig:
    config: dict[str, Any]
    source: str                      # "recipe", "planner" or the user's JSON path
    notes: tuple[str, ...] = ()      # "auto" values filled in, settings fixed
    plan: Optional[Plan] = None      # the memory plan, when a model shape and fleet were given


def _workload(recipe: Recipe, precision: Precision) -> Workload:
    return Workload(global_batch=recipe.train.global_batch, micro_batch=recipe.train.micro_batch,
                    seq_len=recipe.data.max_length, precision=precision,
                    gradient_checkpointing=recipe.train.gradient_checkpointing,
                    eager_attention=recipe.model.attn_implementation == "eager",
                    chunked_loss=recipe.train.chunked_loss)


def _plan(recipe: Recipe, shape: Optional[ModelShape], fleet: Optional[FleetShape], precision: Precision
          ) -> Optional[Plan]:
    """The planner's choice for `deepspeed: auto`, or the table for the recipe's own setting."""
    if shape is None or fleet is None:
        if recipe.deepspeed.zero == "auto":
            raise DeepfleetError("deepspeed: auto needs the model config and the fleet's memory to choose",
                                 where="deepspeed.zero",
                                 fix="pass model_config= (or model_shape=) and fleet= (run `deepfleet plan` to see "
                                     "the choice), or set deepspeed.zero to 0, 1, 2 or 3")
        return None
    workload = _workload(recipe, precision)
    if recipe.deepspeed.zero == "auto":
        return choose_zero_setting(shape, fleet, workload)
    return plan_fixed_setting(shape, fleet, workload, stage=int(recipe.deepspeed.zero),
                              offload=_offload_setting(recipe))


def _setting_of(config: dict[str, Any]) -> tuple[int, Offload]:
    """ZeRO stage and offload of a finished DeepSpeed config."""
    zero = config.get("zero_optimization") or {}
    devices = [(zero.get(kind) or {}).get("device", "none") for kind in ("offload_optimizer", "offload_param")]
    offload: Offload = "optimizer+params" if devices[1] != "none" else "optimizer" if devices[0] != "none" else "none"
    return int(zero.get("stage", 0)), offload


def _user_config(recipe: Recipe, ours: dict[str, Any], text: str, *, source: str, common: dict[str, Any],
                 hf_export: bool) -> CheckedDeepSpeedConfig:
    """The user's JSON, checked; its "auto" values come from deepfleet's config at the user's own stage."""
    data = parse_deepspeed_json(text, source)
    zero = data.get("zero_optimization")
    user_stage = zero.get("stage") if isinstance(zero, dict) else None
    reference = ours
    if user_stage in (0, 1, 2, 3) and user_stage != ours["zero_optimization"]["stage"]:
        reference = build_deepspeed_config(recipe, stage=user_stage, offload="none",
                                           micro_batch=ours["train_micro_batch_size_per_gpu"], **common)
    ctx = ConfigContext(reference=reference, world_size=common["world_size"], hidden_size=common["hidden_size"],
                        bf16_supported=common["bf16_supported"], accelerator=common["accelerator"],
                        hf_export=hf_export)
    return check_user_deepspeed_config(data, ctx, source)


def resolve_run_config(recipe: Recipe, *, world_size: int, total_steps: int, accelerator: str,
                       bf16_supported: bool, model_shape: Optional[ModelShape] = None,
                       fleet: Optional[FleetShape] = None, user_config_text: Optional[str] = None,
                       hf_export: bool = True, prebuilt_ops: frozenset[str] = frozenset()
                       ) -> ResolvedDeepSpeedConfig:
    """The config a run uses, with where it came from, what was filled in, and (given a model shape and the
    fleet) the memory plan. `prebuilt_ops`: DeepSpeed ops compiled at install time on every host."""
    if fleet is not None and fleet.world_size != world_size:
        raise ValueError(f"fleet has {fleet.world_size} ranks but world_size is {world_size}")
    precision = resolve_precision(recipe.precision, accelerator=accelerator, bf16_supported=bf16_supported)
    auto = recipe.deepspeed.zero == "auto"
    plan = _plan(recipe, model_shape, fleet, precision) if (auto or recipe.deepspeed.config is None) else None
    common = dict(world_size=world_size, total_steps=total_steps, accelerator=accelerator,
                  bf16_supported=bf16_supported, hidden_size=model_shape.hidden_size if model_shape else None,
                  prebuilt_ops=prebuilt_ops)
    if plan is not None and auto:
        ours = build_deepspeed_config(recipe, stage=plan.choice.stage, offload=plan.choice.offload,
                                      micro_batch=plan.choice.micro_batch, **common)
    else:
        ours = build_deepspeed_config(recipe, stage=int(recipe.deepspeed.zero if not auto else 2), **common)
    if recipe.deepspeed.config is None:
        return ResolvedDeepSpeedConfig(config=ours, source="planner" if auto else "recipe", plan=plan)
    text = read_deepspeed_json(recipe.deepspeed.config) if user_config_text is None else user_config_text
    checked = _user_config(recipe, ours, text, source=recipe.deepspeed.config, common=common, hf_export=hf_export)
    if model_shape is not None and fleet is not None:
        stage, offload = _setting_of(checked.config)
        workload = replace(_workload(recipe, precision), micro_batch=checked.config["train_micro_batch_size_per_gpu"])
        plan = plan_fixed_setting(model_shape, fleet, workload, stage=stage, offload=offload,
                                  source=recipe.deepspeed.config)
    return ResolvedDeepSpeedConfig(config=checked.config, source=recipe.deepspeed.config, notes=checked.notes,
                                   plan=plan)


def check_deepspeed_json(text: str, *, source: str, recipe: Optional[Recipe], world_size: int, accelerator: str,
                         bf16_supported: bool, total_steps: int = 0, hidden_size: Optional[int] = None,
                         hf_export: bool = True) -> CheckedDeepSpeedConfig:
    """`deepfleet check-ds-config`: a DeepSpeed JSON checked against the recipe and fleet. Without a recipe only
    the JSON and the world size count: "auto" and missing batch sizes are left for the recipe to fill."""
    if recipe is None:
        ctx = ConfigContext(reference={}, world_size=world_size, hidden_size=None, bf16_supported=bf16_supported,
                            accelerator=accelerator, hf_export=hf_export, recipe_given=False)
        return check_user_deepspeed_config(parse_deepspeed_json(text, source), ctx, source)
    common = dict(world_size=world_size, total_steps=total_steps, accelerator=accelerator,
                  bf16_supported=bf16_supported, hidden_size=hidden_size)
    stage = recipe.deepspeed.zero if recipe.deepspeed.zero != "auto" else 2
    ours = build_deepspeed_config(recipe, stage=int(stage), **common)
    return _user_config(recipe, ours, text, source=source, common=common, hf_export=hf_export)


def deepspeed_config_for_run(recipe: Recipe, *, world_size: int, total_steps: int, accelerator: str,
                             bf16_supported: bool, model_config: Any = None, model_shape: Optional[ModelShape] = None,
                             fleet: Optional[FleetShape] = None, user_config_text: Optional[str] = None,
                             hf_export: bool = True, prebuilt_ops: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The config a run uses: the recipe's explicit stage, the planner's choice, or the user's JSON.

    `deepspeed: auto` needs the model (`model_config`, a transformers config, or a `model_shape`) and the
    `fleet` (ranks and memory); the chosen micro batch and accumulation are in the returned config."""
    if model_shape is None and model_config is not None:
        model_shape = model_shape_from_config(model_config, method=recipe.method, lora_rank=recipe.lora.r,
                                              lora_targets=recipe.lora.target_modules)
    return resolve_run_config(recipe, world_size=world_size, total_steps=total_steps, accelerator=accelerator,
                              bf16_supported=bf16_supported, model_shape=model_shape, fleet=fleet,
                              user_config_text=user_config_text, hf_export=hf_export,
                              prebuilt_ops=prebuilt_ops).config
