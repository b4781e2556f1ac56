"""A user's own DeepSpeed JSON: parsed, checked against the real schema, "auto" filled in, all problems at once.

DeepSpeed drops "auto" values silently (its pydantic models skip them) and ignores unknown top-level keys,
so both would quietly fall back to defaults. Here every "auto" is filled from the recipe and fleet and
reported, and every unknown key is an error with a did-you-mean.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from deepfleet.errors import DeepfleetError, Problem, did_you_mean
from deepfleet.plan.deepspeed_schema import find_non_objects, find_unknown_keys, removed_deepspeed_keys

AUTO = "auto"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
GATHER_ON_SAVE_KEYS = ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
                       "stage3_gather_fp16_weights_on_model_save")


@dataclass(frozen=True, kw_only=True)
class CheckedDeepSpeedConfig:
    config: dict[str, Any]
    notes: tuple[str, ...]       # what was filled in or fixed, one line each


@dataclass(frozen=True, kw_only=True)
class ConfigContext:
    """What the check knows about the run: the config deepfleet would build, and the hardware."""
    reference: Mapping[str, Any]     # deepfleet's own config for this recipe and fleet: the source of "auto"
                                     # ({} without a recipe)
    world_size: int
    hidden_size: Optional[int]       # for the bucket sizes HF's "auto" derives from the model
    bf16_supported: bool
    accelerator: str
    hf_export: bool = True           # `deepfleet train` always saves an HF model at the end
    recipe_given: bool = True        # False: "auto" and missing batch sizes stay for the recipe to fill


def _get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(node, Mapping):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, str(key)))]
    return [(path, node)]


def _auto_paths(node: Any) -> list[tuple[str, ...]]:
    return [path for path, value in _leaves(node) if value == AUTO]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _number_at_least_0(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# Values DeepSpeed checks only when training starts (with a pydantic traceback), or never:
# JSON key path -> (test, what the value must be). Every `enabled` key must be true or false.
_VALUE_RULES: dict[tuple[str, ...], tuple[Callable[[Any], bool], str]] = {
    ("zero_optimization", "stage"): (lambda value: _is_int(value) and 0 <= value <= 3, "an integer 0-3"),
    **{(key,): (_positive_int, "a positive integer") for key in BATCH_KEYS},
    ("gradient_clipping",): (_number_at_least_0, "a number >= 0"),
    ("optimizer", "params", "lr"): (_number_at_least_0, "a number >= 0"),
}
_ENABLED_RULE = (lambda value: isinstance(value, bool), "true or false")
# Free-form sections (the schema does not list their keys) that DeepSpeed still reads as objects.
_FREE_FORM_OBJECTS = (("optimizer", "params"), ("scheduler", "params"))


def _hidden_size_value(path: tuple[str, ...], hidden: Optional[int]) -> Optional[int]:
    """The model-dependent bucket sizes, by the rules HF's DeepSpeed integration uses for "auto"."""
    rules = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    if hidden is None or path[:1] != ("zero_optimization",) or len(path) != 2 or path[1] not in rules:
        return None
    return rules[path[1]](hidden)


def _scheduler_value(path: tuple[str, ...], reference: Mapping[str, Any]) -> Any:
    """Scheduler parameters for any DeepSpeed scheduler type, from the reference run's values."""
    if path[:2] != ("scheduler", "params") or len(path) != 3:
        return None
    ref = reference.get("scheduler", {}).get("params", {})
    lr = _get(reference, ("optimizer", "params", "lr"))
    known = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": ref.get("warmup_num_steps"),
             "total_num_steps": ref.get("total_num_steps")}
    return known.get(path[2])


def _fill_autos(config: dict[str, Any], ctx: ConfigContext, source: str) -> tuple[list[str], list[Problem]]:
    notes: list[str] = []
    problems: list[Problem] = []
    if not ctx.recipe_given:
        left = [".".join(path) for path in _auto_paths(config)]
        return ([f'"auto" left for the recipe to fill when training: {", ".join(left)} '
                 "(pass --recipe to check the values)"] if left else []), []
    for path in _auto_paths(config):
        value = _hidden_size_value(path, ctx.hidden_size)
        if value is None:
            value = _get(ctx.reference, path)
        if value is None:
            value = _scheduler_value(path, ctx.reference)
        dotted = ".".join(path)
        if value is None or value == AUTO:
            problems.append(Problem(what=f'"auto" for {dotted} cannot be filled from the recipe or fleet',
                                    where=f"{source}:{dotted}", fix="set an explicit value"))
            continue
        _get(config, path[:-1])[path[-1]] = value
        notes.append(f'{dotted}: "auto" -> {json.dumps(value)}')
    return notes, problems


def _unknown_key_problems(config: Mapping[str, Any], source: str) -> list[Problem]:
    problems: list[Problem] = []
    removed = removed_deepspeed_keys()
    for unknown in find_unknown_keys(config):
        where = f"{source}:{unknown.dotted}"
        if not unknown.path and unknown.key in removed:
            problems.append(Problem(what=f"{unknown.key} is no longer supported by DeepSpeed: "
                                         f"{removed[unknown.key].split('. See')[0]}",
                                    where=where, fix=f"remove {unknown.key}"))
            continue
        hint = did_you_mean(unknown.key, unknown.known)
        problems.append(Problem(what=f"unknown DeepSpeed key {unknown.dotted}{hint}; DeepSpeed would ignore it",
                                where=where, fix="fix the spelling or remove it" if hint else "remove it"))
    return problems


def _rule(path: tuple[str, ...]) -> Optional[tuple[Callable[[Any], bool], str]]:
    if path in _VALUE_RULES:
        return _VALUE_RULES[path]
    if path[-1:] == ("enabled",) and "params" not in path:
        return _ENABLED_RULE
    return None


def _type_problem(path: tuple[str, ...], value: Any, what: str, source: str) -> Problem:
    dotted = ".".join(path)
    return Problem(what=f"{dotted} must be {what}, not {json.dumps(value)}", where=f"{source}:{dotted}",
                   fix=f"set {dotted} to {what}")


def _value_problems(config: Mapping[str, Any], source: str) -> list[Problem]:
    """Wrong types and ranges, by JSON key path. Unfilled "auto" values are left to _fill_autos."""
    objects = find_non_objects(config) + [p for p in _FREE_FORM_OBJECTS
                                          if not isinstance(_get(config, p), (Mapping, type(None)))]
    problems = [_type_problem(path, value, "a JSON object", source) for path in objects
                if (value := _get(config, path)) != AUTO]
    for path, value in _leaves(config):
        rule = _rule(path)
        if rule and value != AUTO and not rule[0](value):
            problems.append(_type_problem(path, value, rule[1], source))
    return problems


def _derive_like_deepspeed(batch: Any, micro: Any, accum: Any, world: int) -> tuple[Any, Any, Any]:
    """The missing batch values as DeepSpeed derives them (DeepSpeedConfig._set_batch_related_parameters);
    None where DeepSpeed could not derive them either."""
    if batch is not None and micro is not None and accum is None:
        accum = batch // (micro * world) if batch % (micro * world) == 0 else None
    elif batch is not None and accum is not None and micro is None:
        micro = batch // (accum * world) if batch % (accum * world) == 0 else None
    elif micro is not None and accum is not None and batch is None:
        batch = micro * accum * world
    elif batch is not None and micro is None and accum is None:
        accum, micro = 1, (batch // world if batch % world == 0 else None)
    elif micro is not None and batch is None and accum is None:
        accum, batch = 1, micro * world
    return batch, micro, accum


def _identity_problem(batch: int, micro: int, accum: int, world: int, where: str) -> Problem:
    return Problem(what=f"train_batch_size {batch} != train_micro_batch_size_per_gpu {micro} x "
                        f"gradient_accumulation_steps {accum} x world size {world} (= {micro * accum * world})",
                   where=where, fix=f'set train_batch_size to {micro * accum * world}, or set it to "auto"')


def _batch_problems(config: dict[str, Any], ctx: ConfigContext, source: str) -> tuple[list[str], list[Problem]]:
    """train_batch_size = micro x accumulation x world. Missing values come from the recipe when one was given
    (its data loader runs that micro batch), else as DeepSpeed would derive them; all three end up explicit.
    Without a recipe and with neither batch size, they are the recipe's at training time: left out here."""
    given = [config.get(key) for key in BATCH_KEYS]
    if any(value is not None and not _positive_int(value) for value in given):
        return [], []   # reported by _value_problems
    reference = [ctx.reference.get(key) for key in BATCH_KEYS]
    world = ctx.world_size
    where = f"{source}:train_batch_size"
    if None not in given and given[0] != given[1] * given[2] * world:
        return [], [_identity_problem(*given, world, where)]
    if ctx.recipe_given:
        mismatched = [f"{key} {value} vs recipe {ref}" for key, value, ref in zip(BATCH_KEYS, given, reference)
                      if value is not None and value != ref]
        if mismatched:
            return [], [Problem(what="batch sizes disagree with the recipe: " + ", ".join(mismatched), where=where,
                                fix='set them to "auto" so the recipe decides, or change train.* in the recipe')]
        completed = [ref if value is None else value for value, ref in zip(given, reference)]
    elif given[0] is None and given[1] is None:
        return ["no train_batch_size or train_micro_batch_size_per_gpu: the recipe's are used when training "
                "(pass --recipe to check them)"], []
    else:
        completed = list(_derive_like_deepspeed(*given, world))
    if None in completed:
        return [], [Problem(what=f"train_batch_size {given[0]} is not train_micro_batch_size_per_gpu x "
                                 f"gradient_accumulation_steps x world size {world} for whole numbers",
                            where=where, fix=f"use a train_batch_size that is a multiple of {world}")]
    batch, micro, accum = completed
    if batch != micro * accum * world:
        return [], [_identity_problem(batch, micro, accum, world, where)]
    notes = [f"{key} not set: {value}" for key, value, original in zip(BATCH_KEYS, completed, given)
             if original is None]
    config.update(zip(BATCH_KEYS, completed))
    return notes, []


def _precision_problems(config: Mapping[str, Any], ctx: ConfigContext, source: str) -> list[Problem]:
    fp16 = _get(config, ("fp16", "enabled")) is True
    bf16 = (_get(config, ("bf16", "enabled")) or _get(config, ("bfloat16", "enabled"))) is True
    problems: list[Problem] = []
    if fp16 and bf16:
        problems.append(Problem(what="fp16 and bf16 are both enabled", where=f"{source}:fp16.enabled",
                                fix="enable one of them (bf16 on GPUs that support it)"))
    if bf16 and (ctx.accelerator == "cpu" or not ctx.bf16_supported):
        hardware = "CPU ranks (deepfleet trains fp32 on CPU)" if ctx.accelerator == "cpu" else "this GPU"
        problems.append(Problem(what=f"bf16 is enabled but {hardware} cannot train in bf16",
                                where=f"{source}:bf16.enabled", fix='set bf16.enabled to false or "auto"'))
    return problems


def _offload_problems(zero: Mapping[str, Any], source: str) -> list[Problem]:
    problems: list[Problem] = []
    for section in ("offload_optimizer", "offload_param"):
        entry = zero.get(section)
        if isinstance(entry, Mapping) and entry.get("device") == "nvme" and not entry.get("nvme_path"):
            problems.append(Problem(what=f"{section} to nvme without nvme_path",
                                    where=f"{source}:zero_optimization.{section}.nvme_path",
                                    fix=f'add "nvme_path": "/local_nvme" to zero_optimization.{section}'))
    param = zero.get("offload_param")
    if isinstance(param, Mapping) and param.get("device", "none") != "none" and zero.get("stage", 0) != 3:
        problems.append(Problem(what=f"offload_param needs ZeRO-3, but stage is {zero.get('stage', 0)}",
                                where=f"{source}:zero_optimization.offload_param",
                                fix="set zero_optimization.stage to 3, or remove offload_param"))
    return problems


def _gather_on_save_note(zero: dict[str, Any], ctx: ConfigContext) -> list[str]:
    """An HF export of a ZeRO-3 run needs the 16-bit weights gathered on save: turned on, with a note."""
    if zero.get("stage") != 3 or not ctx.hf_export or any(zero.get(k) for k in GATHER_ON_SAVE_KEYS):
        return []
    for key in GATHER_ON_SAVE_KEYS[1:]:
        zero.pop(key, None)
    zero[GATHER_ON_SAVE_KEYS[0]] = True
    return ["zero_optimization.stage3_gather_16bit_weights_on_model_save set to true: ZeRO-3 needs it to save "
            "an HF model"]


def check_user_deepspeed_config(data: Mapping[str, Any], ctx: ConfigContext,
                                source: str) -> CheckedDeepSpeedConfig:
    """Validate a user's DeepSpeed config and fill its "auto" values; raise every problem at once."""
    config = copy.deepcopy(dict(data))
    problems = _unknown_key_problems(config, source)
    notes, auto_problems = _fill_autos(config, ctx, source)
    problems += auto_problems + _value_problems(config, source)
    batch_notes, batch_problems = _batch_problems(config, ctx, source)
    notes += batch_notes
    problems += batch_problems + _precision_problems(config, ctx, source)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        problems += _offload_problems(zero, source)
        notes += _gather_on_save_note(zero, ctx)
    if problems:
        raise DeepfleetError(problems=problems)
    return CheckedDeepSpeedConfig(config=config, notes=tuple(notes))
