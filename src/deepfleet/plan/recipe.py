"""The recipe: one YAML file that says what to train, on what data, and how.

Every section is a typed model that forbids unknown keys; `recipe_io.load_recipe` turns
pydantic's errors into one line each, with file:line, key path and a did-you-mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args, get_origin

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from deepfleet import env_vars
from deepfleet.errors import did_you_mean

BUILTIN_MODEL_PREFIX = "builtin:"
TINY_MODEL_NAME = "builtin:tiny"
BUILTIN_DATA = "builtin:tasks"


def _takes_numbers(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return any(type(arg) is int for arg in get_args(annotation))
    return any(_takes_numbers(arg) for arg in get_args(annotation))


class Section(BaseModel):
    # allow_inf_nan=False: an infinite or NaN lr/epochs would train NaN or overflow later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1, so `global_batch: true` or `deepspeed: true` would quietly mean 1.
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is not a number")
        return value


class ModelSpec(Section):
    name: str = "builtin:tiny"               # HF Hub id, local HF dir, or builtin:tiny
    revision: Optional[str] = None            # Hub revision (branch, tag or commit)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False


class LoraSpec(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class ValidationSpec(Section):
    split: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of train held out
    files: list[str] = []                       # or separate validation files
    every_steps: int = Field(0, ge=0)           # 0: only at the end


class DataSpec(Section):
    train: list[str] = [BUILTIN_DATA]           # JSONL/JSON/parquet files, a saved HF dataset dir, or builtin:tasks
    format: Literal["auto", "messages", "alpaca", "sharegpt", "text"] = "auto"
    max_length: int = Field(512, ge=8)
    packing: bool = True
    validation: ValidationSpec = ValidationSpec()
    cache_dir: Optional[str] = None             # prepared (tokenized) data; default $XDG_CACHE_HOME or ~/.cache, /deepfleet/data
    prepare_workers: Optional[int] = Field(None, gt=0)   # processes preparing it on the head; unset: one per core

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class TrainSpec(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)   # overrides epochs when set
    global_batch: int = Field(16, gt=0)            # sequences (or packed rows) per optimizer step, all ranks
    micro_batch: int = Field(4, gt=0)              # per rank per forward
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(0.03, ge=0)              # < 1: fraction of steps (rounded up); >= 1: steps; 0: none
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)        # 0 turns clipping off
    seed: int = Field(42, ge=0, lt=2**32)         # numpy seeds must fit in 32 bits
    gradient_checkpointing: bool = False
    # Cross-entropy over chunks of tokens from the last hidden states, never the whole [tokens x vocab] logits
    # (train/chunked_loss.py). auto: on where measured at least as fast as the plain loss (CPU); true: on
    # wherever the model allows it (a model that does not says why in the startup line); false: the model's own loss.
    chunked_loss: Union[Literal["auto"], bool] = "auto"
    # The model compiled with torch.compile through DeepSpeed's engine (train/compiled_model.py). auto: on where
    # measured faster and checked against eager (see README); true: compiled, and a failure to compile stops the
    # run with one line before its first step; false: eager.
    compile: Union[Literal["auto"], bool] = "auto"

    @field_validator("chunked_loss", "compile", mode="before")
    @classmethod
    def _auto_or_boolean(cls, value):
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"{value!r} is not auto, true or false")
        return value


def _model_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _deepspeed_shorthand(value: Any) -> Any:
    # `deepspeed: auto` lets the planner choose; `deepspeed: 2` is a ZeRO stage; `deepspeed: ds.json` a user config.
    if value == "auto" or isinstance(value, int):
        return {"zero": value}
    return {"config": value} if isinstance(value, str) else value


# Sections a recipe may write as a scalar, and the mapping each scalar stands for.
SECTION_SHORTHANDS: dict[str, Callable[[Any], Any]] = {"model": _model_shorthand, "deepspeed": _deepspeed_shorthand}


def _env_name(name: str) -> str:
    if not env_vars.NAME.match(name):
        raise ValueError("not an environment variable name: use letters, digits and '_', not starting with a digit")
    return name


class DeepSpeedSpec(Section):
    zero: Literal["auto", 0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: Optional[str] = None
    config: Optional[str] = None     # path to the user's own DeepSpeed JSON; validated, "auto" filled in

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return _deepspeed_shorthand(value)


class CheckpointSpec(Section):
    every_steps: int = Field(0, ge=0)        # 0: off
    every_minutes: float = Field(0, ge=0)    # 0: off
    keep: int = Field(2, ge=1)               # newest complete checkpoints kept
    preempt_signal: Literal["SIGTERM", "SIGUSR1"] = "SIGTERM"


TRACKERS = ("tensorboard", "wandb", "mlflow")


class LoggingSpec(Section):
    every_steps: int = Field(1, gt=0)
    trackers: list[str] = ["tensorboard"]     # where rank 0 sends metrics.jsonl's fields: tensorboard, wandb, mlflow
    tensorboard: Optional[bool] = None        # older switch: when set, turns TensorBoard on/off whatever trackers says
    project: Optional[str] = None             # W&B project / MLflow experiment; unset: $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, else "deepfleet"
    run_name: Optional[str] = None            # the trackers' run name; unset: output_dir's name
    tags: list[str] = []                      # the trackers' run tags
    upload_model: bool = False                # upload output_dir/final to W&B/MLflow (default: record its path only)
    peak_tflops: Optional[float] = Field(None, gt=0)   # per rank, for MFU; unset: the GPU peak table, else measured
    heartbeat_seconds: float = Field(5.0, gt=0)

    @field_validator("trackers", "tags", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}{did_you_mean(name, TRACKERS)}; "
                                 f"trackers are {', '.join(TRACKERS)}")
        return list(dict.fromkeys(names))

    @property
    def enabled_trackers(self) -> tuple[str, ...]:
        """`trackers`, with TensorBoard added or removed by the `tensorboard` switch when it is set."""
        names = [name for name in self.trackers if name != "tensorboard" or self.tensorboard is not False]
        if self.tensorboard and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        return tuple(names)


class Recipe(Section):
    model: ModelSpec = ModelSpec()
    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSpec = LoraSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    output_dir: str = Field("runs/demo", min_length=1)
    resume: bool = True
    env: dict[Annotated[str, AfterValidator(_env_name)], str] = {}   # extra environment for every rank

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value):
        return _model_shorthand(value)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)
