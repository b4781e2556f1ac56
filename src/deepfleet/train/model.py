"""The model a rank trains: built-in tiny, HF Hub id or local dir; full, LoRA or QLoRA.

Under ZeRO-3 an `HfDeepSpeedConfig` must exist (and stay referenced) before the model is built,
so transformers wraps loading in `deepspeed.zero.Init` and every rank holds only its partition.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from deepfleet.errors import DeepfleetError, exception_summary
from deepfleet.plan.recipe import LoraSpec, ModelSpec, Recipe
from deepfleet.train.builtin import TINY_MODEL_NAME, builtin_model_config
from deepfleet.train.tokenizer import load_tokenizer
from deepfleet.train import packed_attention  # noqa: F401  (registers the per-sequence attention)
from deepfleet.train.families import (AttentionChoice, Family, check_packing, choose_attention, family_of,
                                      remote_code_refusal)
from deepfleet.train.flops import TrainingFlops, training_flops_of
from deepfleet.train.loss_head import LossChoice, choose_loss
from deepfleet.train.model_facts import check_method_supported, check_model_source


@dataclass(kw_only=True)
class BuiltModel:
    model: torch.nn.Module
    n_params: int              # all parameters (ZeRO-3: counted from the partitions' full sizes)
    n_trainable: int
    flops: TrainingFlops       # what a training step costs per sequence, for MFU
    family: Family
    attention: AttentionChoice
    loss: LossChoice           # plain or chunked cross-entropy, and why
    zero3_config: Any = None   # the HfDeepSpeedConfig; transformers only keeps a weak reference


def flash_attention_available(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def load_model_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
    """The model's config without its weights: built-in (its vocabulary from the tokenizer), a local
    HF dir, or a Hub id (config.json only)."""
    if spec.name == TINY_MODEL_NAME:
        return builtin_model_config(tokenizer or load_tokenizer(spec))
    path = Path(spec.name).expanduser()
    if spec.name.startswith((".", "/", "~")) and not path.is_dir():
        raise DeepfleetError(f"model path {str(path)!r} does not exist or is not a directory", where="model.name",
                             fix="point model.name at a local HF model dir (with config.json) or use a Hub id")
    try:
        return AutoConfig.from_pretrained(_local_or_hub(spec.name), revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code)
    except ValueError as exc:
        if not spec.trust_remote_code and "trust_remote_code" in str(exc):   # a model_type only its own code knows
            raise remote_code_refusal(spec.name) from None
        raise _config_error(spec, exc) from None
    except Exception as exc:   # transformers' own checks of a config raise anything from KeyError to AttributeError
        raise _config_error(spec, exc) from None


def _config_error(spec: ModelSpec, exc: Exception) -> DeepfleetError:
    return DeepfleetError(f"cannot load the config of model {spec.name!r}: {exception_summary(exc)}",
                          where="model.name",
                          fix="check the Hub id / local dir, network access and HF_TOKEN for gated models")


def model_family(recipe: Recipe, config: PretrainedConfig) -> Family:
    """The model's family, checked against the recipe: packing and LoRA targets (one line each)."""
    family = family_of(config, model_name=recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    check_packing(family, packing=recipe.data.packing)
    if recipe.method != "full" and recipe.lora.target_modules != "all-linear":
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        check_lora_targets(skeleton, recipe.lora.target_modules, family=family)
    return family


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the Linear layers LoRA can target, without the output head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output})


def check_lora_targets(model: torch.nn.Module, targets: list[str], *, family: Family) -> None:
    names = linear_layer_names(model)
    missing = [target for target in targets if target not in names]
    if missing:
        raise DeepfleetError(f"LoRA target modules {missing} are not Linear layers of this {family.label} model",
                             where="lora.target_modules",
                             fix=f'use "all-linear", or names from this model: {", ".join(names)}')


def torch_dtype_for(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, *, ds_config: dict, precision: str,
                device: torch.device, for_training: bool = False) -> BuiltModel:
    """Build or load the model, partitioned under ZeRO-3, with LoRA adapters when asked.

    for_training: the model only ever sees training/eval micro batches (which may be packed rows),
    never generation, so packed rows may use their own attention implementation."""
    check_method_supported(recipe)
    check_model_source(recipe)
    config = load_model_config(recipe.model, tokenizer)
    family = model_family(recipe, config)
    zero3_config = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        zero3_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(recipe.train.seed)  # same initial weights on every rank
    attention = choose_attention(family, requested=recipe.model.attn_implementation, device_type=device.type,
                                 packed_rows=for_training and recipe.data.packing,
                                 flash_available=flash_attention_available(device.type))
    model = _load_base(recipe, config, attn=attention.implementation, precision=precision, device=device)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if recipe.method in ("lora", "qlora"):
        model = _with_lora(model, recipe.lora, quantized=recipe.method == "qlora",
                           gradient_checkpointing=recipe.train.gradient_checkpointing)
    if zero3_config is not None and family.is_moe:
        _register_moe_leaves(model, family)
    return BuiltModel(model=model, n_params=count_parameters(model), zero3_config=zero3_config,
                      n_trainable=count_parameters(model, trainable_only=True), flops=training_flops_of(model, config),
                      family=family, attention=attention,
                      loss=choose_loss(model, requested=recipe.train.chunked_loss, device_type=device.type))


def _register_moe_leaves(model: torch.nn.Module, family: Family) -> None:
    """ZeRO-3 gathers a leaf module's parameters as one unit: ranks routing tokens to different
    experts then still fetch the same parameters in the same order, instead of hanging."""
    from deepspeed.utils import set_z3_leaf_modules
    classes = list({type(module) for module in model.modules() if type(module).__name__ == family.moe_block})
    if not classes:
        raise DeepfleetError(f"this {family.label} model has no {family.moe_block} module to register for ZeRO-3",
                             where="model.name", fix="use deepspeed.zero: 2 for this model")
    set_z3_leaf_modules(model, classes)


def _local_or_hub(name: str) -> str:
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def _load_base(recipe: Recipe, config: PretrainedConfig, *, attn: str, precision: str,
               device: torch.device) -> PreTrainedModel:
    spec = recipe.model
    dtype = torch_dtype_for(precision)
    if spec.name == TINY_MODEL_NAME:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code,
                              "attn_implementation": attn, "dtype": dtype}
    if recipe.method == "qlora":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(_local_or_hub(spec.name), **kwargs)
    except OSError as exc:
        raise DeepfleetError(f"cannot load model {spec.name!r}: {str(exc).splitlines()[0]}", where="model.name",
                             fix="check the Hub id / local dir, network access and HF_TOKEN for gated models") from None


def _with_lora(model: PreTrainedModel, spec: LoraSpec, *, quantized: bool,
               gradient_checkpointing: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = ", ".join(linear_layer_names(model))
        raise DeepfleetError(f"LoRA target modules do not match this model: {str(exc).splitlines()[0]}",
                             where="lora.target_modules", fix=f'use "all-linear" or names of its Linear layers: {names}'
                             ) from None


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    # ZeRO-3 partitions have numel 0 locally; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
               if p.requires_grad or not trainable_only)
