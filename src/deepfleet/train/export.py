"""`deepfleet export`: a complete checkpoint (ZeRO 0-3, any world size) -> one HF model dir.

ZeRO 1-3 shards are consolidated by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`;
ZeRO-0 keeps the whole module in rank 0's model-states file. The model is rebuilt from the recipe
stored in the checkpoint, the weights loaded, and the dir written like `final/` (LoRA: an adapter
dir, or with `merge` a full model with the adapter folded in).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train.builtin import TINY_MODEL_NAME
from deepfleet.train.checkpoint import DS_CONFIG_FILE, ENGINE_TAG, RECIPE_FILE, complete_checkpoints
from deepfleet.train.model import build_model
from deepfleet.train.save import write_model_dir
from deepfleet.train.tokenizer import load_tokenizer


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    complete = dict(complete_checkpoints(run_dir))
    if not complete:
        raise DeepfleetError(f"no complete checkpoint in {run_dir}", where=str(run_dir),
                             fix="pass the output_dir of a run that saved checkpoints (checkpoint.every_steps)")
    if step is None:
        return complete[max(complete)]
    if step not in complete:
        raise DeepfleetError(f"no complete checkpoint for step {step}", where=str(run_dir),
                             fix=f"use one of --step {', '.join(map(str, sorted(complete)))}")
    return complete[step]


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    stage = json.loads((checkpoint / DS_CONFIG_FILE).read_text())["zero_optimization"]["stage"]
    if stage == 0:
        return torch.load(checkpoint / ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False,
                          map_location="cpu")["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)


def export_checkpoint(run_dir: Path, *, to: Path, step: int | None = None, merge: bool = False) -> Path:
    checkpoint = pick_checkpoint(run_dir, step)
    recipe = load_recipe(checkpoint / RECIPE_FILE)
    is_lora = recipe.method != "full"
    if merge and not is_lora:
        raise DeepfleetError("--merge only applies to LoRA runs; this run trained every weight",
                             where=str(checkpoint), fix="drop --merge")
    tokenizer = load_tokenizer(recipe.model)
    model = build_model(recipe, tokenizer, ds_config={}, precision="fp32", device=torch.device("cpu")).model
    state = {key: value.float() for key, value in consolidated_state_dict(checkpoint).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {key for key in missing if "lm_head" in key and model.config.tie_word_embeddings} \
        if hasattr(model, "config") else set()
    if unexpected or set(missing) - tied:
        raise DeepfleetError(f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} "
                             f"unexpected keys (e.g. {(list(missing) + list(unexpected))[:2]})",
                             where=str(checkpoint), fix="export with the deepfleet version that trained it")
    if merge:
        model, is_lora = model.merge_and_unload(), False
    return write_model_dir(model, tokenizer, to, state_dict=None, is_lora=is_lora,
                           base_model_name=recipe.model.name,
                           save_base_weights=is_lora and recipe.model.name == TINY_MODEL_NAME,
                           run_info={"exported_from": str(checkpoint)})
