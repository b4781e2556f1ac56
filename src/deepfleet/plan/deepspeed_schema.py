"""Which keys DeepSpeed reads, at every level, derived from the installed DeepSpeed itself.

DeepSpeed silently ignores unknown top-level keys (its parser only `.get`s the keys it knows), so a typo
falls back to the default. This schema lets deepfleet reject such keys with a did-you-mean. It is not a
hand-typed list; it comes from:

- top-level keys, and the keys of sections DeepSpeed parses by hand (activation_checkpointing, aio,
  checkpoint, flops_profiler, autotuning, data_types, ...): recorded by running DeepSpeed's own parser,
  `deepspeed.runtime.config.DeepSpeedConfig._initialize_params`, on dicts that record every key read;
- sections DeepSpeed parses with pydantic models (zero_optimization with its offload sections, fp16, bf16,
  the monitors, comms_logger, compile, tensor_parallel, hybrid_engine, timers.throughput): the models'
  field names and aliases, nested models included;
- `sequence_parallel_size` and `data_parallel_size`, read by `deepspeed.initialize` rather than the parser;
- keys DeepSpeed has removed (its `_REMOVED_TOP_LEVEL_CONFIG_KEYS`): reported with DeepSpeed's own message.

`optimizer.params` and `scheduler.params` are the optimizer's and scheduler's keyword arguments, which
DeepSpeed passes on unchecked, so they are free-form here too.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Union, get_args

from pydantic import BaseModel

# key -> sub-schema, or None when the value is not checked further (a scalar, or free-form)
KeySchema = Mapping[str, Optional["KeySchema"]]

# Seeds that make DeepSpeed's parser take its conditional branches (e.g. `params` is only read with a `type`).
_SECTION_SEEDS: tuple[dict[str, Any], ...] = ({}, {"type": "AdamW"}, {"enabled": True})


class _RecordingDict(dict):
    """A dict that notes every key looked up in it, however the lookup is spelled."""

    def __init__(self, *args: Any, seen: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self) -> "_RecordingKeys":  # `key in config.keys()` is a common DeepSpeed idiom
        return _RecordingKeys(self)


@dataclass(frozen=True)
class _RecordingKeys:
    owner: _RecordingDict

    def __contains__(self, key: Any) -> bool:
        return key in self.owner

    def __iter__(self) -> Iterator[Any]:
        return dict.__iter__(self.owner)

    def __len__(self) -> int:
        return dict.__len__(self.owner)


def _keys_deepspeed_reads(section: Optional[str] = None, seed: Optional[dict[str, Any]] = None) -> set[str]:
    """Keys DeepSpeed's config parser looks up at the top level (section None) or inside `section`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()
    inner = _RecordingDict(seed or {}, seen=seen)
    # Never empty: some parsers skip their section when the whole config is falsy (`if param_dict and ...`).
    probe = {"_deepfleet_probe": None}
    top = (_RecordingDict(probe, seen=seen) if section is None
           else _RecordingDict({section: inner, **probe}, seen=set()))
    try:
        DeepSpeedConfig._initialize_params(types.SimpleNamespace(), top)
    except Exception:  # a seed DeepSpeed rejects teaches nothing; the parser's own errors are not ours here
        return set()
    return {key for key in seen if isinstance(key, str)} - set(probe)


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    candidates = [annotation, *get_args(annotation)]
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def pydantic_key_schema(model: type[BaseModel]) -> dict[str, Optional[KeySchema]]:
    """Field names and aliases of a DeepSpeed pydantic config model, nested models as sub-schemas."""
    schema: dict[str, Optional[KeySchema]] = {}
    for name, field in model.model_fields.items():
        nested = _model_classes(field.annotation)
        sub = pydantic_key_schema(nested[0]) if nested else None
        for key in {name, field.alias or name}:
            schema[key] = sub
    return schema


def _pydantic_sections() -> dict[str, Optional[KeySchema]]:
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import DeepSpeedMonitorConfig
    from deepspeed.runtime.config import HybridEngineConfig
    from deepspeed.runtime.precision_config import (BFLOAT16, BFLOAT16_OLD, FP16, DeepSpeedBF16Config,
                                                    DeepSpeedFP16Config)
    from deepspeed.runtime.tensor_parallel.config import TPTrainingConfig
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION, DeepSpeedZeroConfig
    from deepspeed.utils.config import TIMERS, TIMERS_THROUGHPUT, DeepSpeedThroughputTimerConfig

    sections: dict[str, Optional[KeySchema]] = {
        ZERO_OPTIMIZATION: pydantic_key_schema(DeepSpeedZeroConfig),
        FP16: pydantic_key_schema(DeepSpeedFP16Config),
        BFLOAT16: pydantic_key_schema(DeepSpeedBF16Config),
        BFLOAT16_OLD: pydantic_key_schema(DeepSpeedBF16Config),
        "comms_logger": pydantic_key_schema(CommsLoggerConfig),
        "compile": pydantic_key_schema(CompileConfig),
        "tensor_parallel": pydantic_key_schema(TPTrainingConfig),
        "hybrid_engine": pydantic_key_schema(HybridEngineConfig),
        TIMERS: {TIMERS_THROUGHPUT: pydantic_key_schema(DeepSpeedThroughputTimerConfig)},
    }
    sections.update(pydantic_key_schema(DeepSpeedMonitorConfig))  # tensorboard, wandb, csv_monitor, comet
    return sections


def _recorded_section(section: str) -> Optional[KeySchema]:
    keys: set[str] = set()
    for seed in _SECTION_SEEDS:
        keys |= _keys_deepspeed_reads(section, seed)
    # `params` of the optimizer and scheduler are keyword arguments DeepSpeed passes on unchecked.
    return {key: None for key in keys} if keys else None


@functools.cache
def deepspeed_key_schema() -> KeySchema:
    """The full key schema of the installed DeepSpeed (computed once)."""
    top_keys = _keys_deepspeed_reads() | {"sequence_parallel_size", "data_parallel_size"}
    if not {"train_batch_size", "zero_optimization", "optimizer"} <= top_keys:
        import deepspeed

        raise RuntimeError(f"could not read the config keys of DeepSpeed {deepspeed.__version__} from its parser; "
                           "deepfleet/plan/deepspeed_schema.py needs updating for this version")
    pydantic_sections = _pydantic_sections()
    schema: dict[str, Optional[KeySchema]] = {}
    for key in sorted(top_keys | set(pydantic_sections)):
        schema[key] = pydantic_sections[key] if key in pydantic_sections else _recorded_section(key)
    return schema


@functools.cache
def removed_deepspeed_keys() -> Mapping[str, str]:
    """Top-level keys DeepSpeed has removed, with DeepSpeed's own explanation."""
    from deepspeed.runtime import config

    return dict(getattr(config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))


@dataclass(frozen=True, kw_only=True)
class UnknownKey:
    path: tuple[str, ...]          # where the key sits, without the key itself
    key: str
    known: tuple[str, ...]         # the keys allowed at that level

    @property
    def dotted(self) -> str:
        return ".".join((*self.path, self.key))


def find_unknown_keys(config: Mapping[str, Any], schema: Optional[KeySchema] = None,
                      path: tuple[str, ...] = ()) -> list[UnknownKey]:
    """Every key of `config`, at any depth, that DeepSpeed does not read."""
    schema = deepspeed_key_schema() if schema is None else schema
    unknown: list[UnknownKey] = []
    for key, value in config.items():
        if key not in schema:
            unknown.append(UnknownKey(path=path, key=str(key), known=tuple(sorted(schema))))
            continue
        sub: Union[KeySchema, None] = schema[key]
        if sub is not None and isinstance(value, Mapping):
            unknown.extend(find_unknown_keys(value, sub, (*path, str(key))))
    return unknown


def find_non_objects(config: Mapping[str, Any], schema: Optional[KeySchema] = None,
                     path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of sections DeepSpeed reads as JSON objects that hold something else. Nested sections may be
    null (DeepSpeed's models make them optional); DeepSpeed fails on a null or non-object top-level section."""
    schema = deepspeed_key_schema() if schema is None else schema
    found: list[tuple[str, ...]] = []
    for key, value in config.items():
        sub = schema.get(key)
        if sub is None:
            continue
        if isinstance(value, Mapping):
            found.extend(find_non_objects(value, sub, (*path, str(key))))
        elif value is not None or not path:
            found.append((*path, str(key)))
    return found
