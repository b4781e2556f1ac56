"""Save the trained model as an HF dir: full weights (safetensors) or a PEFT adapter, plus the tokenizer.

The dir is written under a temporary name and renamed into place, so a crash never leaves a
half-written `final/`. Under ZeRO-3 the weights are gathered layer by layer onto rank 0 first
(every rank must call `save_final_model`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from deepfleet.train.chat_labels import generation_stop_ids

FINAL_DIR = "final"
BASE_SUBDIR = "base"           # built-in base weights next to a LoRA adapter (they exist nowhere else)
RUN_INFO_FILE = "deepfleet.json"


def save_final_model(engine, tokenizer: PreTrainedTokenizerBase, output_dir: Path, *, rank: int,
                     is_lora: bool, base_model_name: str, save_base_weights: bool,
                     run_info: dict | None = None) -> Path | None:
    """Write output_dir/final atomically; returns its path on rank 0, None elsewhere."""
    state_dict = None
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank
    final = output_dir / FINAL_DIR
    if rank == 0:
        write_model_dir(engine.module, tokenizer, final, state_dict=state_dict, is_lora=is_lora,
                        base_model_name=base_model_name, save_base_weights=save_base_weights, run_info=run_info)
    if dist.is_initialized():
        dist.barrier()
    return final if rank == 0 else None


def is_model_dir(path: Path) -> bool:
    """Whether `path` was written by `write_model_dir` (so replacing it loses nothing else)."""
    return (path / RUN_INFO_FILE).is_file()


def write_model_dir(module, tokenizer: PreTrainedTokenizerBase, target: Path, *, state_dict: dict | None,
                    is_lora: bool, base_model_name: str, save_base_weights: bool,
                    run_info: dict | None = None) -> Path:
    """An HF model dir (or PEFT adapter dir) plus tokenizer at `target`, via a staging dir and a rename."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        stop_generation_at_turn_end(module, tokenizer)
        if is_lora:
            _save_adapter(module, staging, state_dict=state_dict, base_model_name=base_model_name,
                          save_base_weights=save_base_weights)
        else:
            module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / RUN_INFO_FILE).write_text(json.dumps({"base_model": base_model_name, "lora": is_lora,
                                                          **(run_info or {})}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_dir(staging, target)
    return target


def stop_generation_at_turn_end(module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the saved generation_config stop where training taught answers to end, so a plain
    `model.generate` stops at `<|eot_id|>` / `<|im_end|>` too, not only `deepfleet generate`."""
    config = getattr(module, "generation_config", None)
    if config is None:
        return
    stops = generation_stop_ids(module, tokenizer)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops


def _save_adapter(module, staging: Path, *, state_dict: dict | None, base_model_name: str,
                  save_base_weights: bool) -> None:
    module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    if not save_base_weights:
        return
    # A built-in base model is random-initialised, so its weights ship with the adapter.
    full = state_dict if state_dict is not None else module.state_dict()
    base_state = {_base_key(key): value for key, value in full.items() if "lora_" not in key}
    module.get_base_model().save_pretrained(staging / BASE_SUBDIR, state_dict=base_state, safe_serialization=True)
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_SUBDIR
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _base_key(key: str) -> str:
    """PEFT's full-state key -> the base model's key (drop the wrapper prefix and `.base_layer`)."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


def _replace_dir(staging: Path, final: Path) -> None:
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)

