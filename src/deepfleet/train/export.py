"""`deepfleet export`: a complete checkpoint (ZeRO 0-3, any world size) -> one HF model dir.

ZeRO 1-3 shards are consolidated by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`;
ZeRO-0 keeps the whole module in rank 0's model-states file. The model is rebuilt from the recipe
stored in the checkpoint, the weights loaded, and the dir written like `final/` (LoRA: an adapter
dir, or with `merge` a full model with the adapter folded in).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from deepfleet.errors import DeepfleetError, exception_summary
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train.builtin import TINY_MODEL_NAME
from deepfleet.train.checkpoint_layout import CHECKPOINTS_DIR, DS_CONFIG_FILE, ENGINE_TAG, RECIPE_FILE, complete_checkpoints
from deepfleet.train.model import build_model
from deepfleet.train.save import is_model_dir, write_model_dir
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


def resolved_export_target(to: Path, run_dir: Path) -> Path:
    """`to` made absolute, or a DeepfleetError when writing there would destroy something."""
    target = to.expanduser().resolve()
    problem = _target_problem(target, run_dir.expanduser().resolve())
    if problem:
        raise DeepfleetError(problem, where=str(target), fix="choose a new or empty directory for --to")
    return target


def _target_problem(target: Path, run_dir: Path) -> str:
    if not target.name:
        return "--to is the filesystem root"
    if run_dir.is_relative_to(target):
        return "--to is or contains the run dir, which the export would replace"
    if target.is_relative_to(run_dir / CHECKPOINTS_DIR):
        return f"--to is inside the run's {CHECKPOINTS_DIR}/ dir, which must stay untouched"
    if Path.cwd().is_relative_to(target):
        return "--to is or contains the current directory, which the export would replace under your shell"
    if target.exists() and not target.is_dir():
        return "--to exists and is not a directory"
    if target.is_dir() and any(target.iterdir()) and not is_model_dir(target):
        return "--to is a non-empty directory that is not a previous deepfleet export, and would be replaced"
    return ""


def checkpoint_recipe_file(checkpoint: Path) -> Path:
    path = checkpoint / RECIPE_FILE
    if not path.is_file():
        raise DeepfleetError(f"checkpoint has no {RECIPE_FILE}: this is not a deepfleet run dir, or it is damaged",
                             where=str(checkpoint),
                             fix="pass the output_dir of a deepfleet training run, or export another step "
                                 "with --step N")
    return path


# What a corrupt, truncated or missing checkpoint file raises while it is read.
DAMAGED_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, pickle.UnpicklingError)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    stage = _zero_stage(checkpoint)
    if not (checkpoint / ENGINE_TAG).is_dir():
        raise _damaged(checkpoint, f"it has no {ENGINE_TAG}/ dir")
    try:
        return _read_weights(checkpoint, stage)
    except DAMAGED_FILE_ERRORS as exc:
        raise _damaged(checkpoint, f"cannot read the weights in {ENGINE_TAG}/ ({exception_summary(exc)})") from None


def _zero_stage(checkpoint: Path) -> int:
    try:
        return json.loads((checkpoint / DS_CONFIG_FILE).read_text())["zero_optimization"]["stage"]
    except DAMAGED_FILE_ERRORS as exc:
        raise _damaged(checkpoint, f"{DS_CONFIG_FILE} is missing or not a DeepSpeed config ({exception_summary(exc)})") \
            from None


def _read_weights(checkpoint: Path, stage: int) -> dict[str, torch.Tensor]:
    if stage == 0:
        return torch.load(checkpoint / ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False,
                          map_location="cpu")["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)


def _damaged(checkpoint: Path, detail: str) -> DeepfleetError:
    return DeepfleetError(f"checkpoint is damaged: {detail}", where=str(checkpoint),
                          fix="export another step with --step N, or re-run training")


def export_checkpoint(run_dir: Path, *, to: Path, step: int | None = None, merge: bool = False) -> Path:
    target = resolved_export_target(to, run_dir)
    checkpoint = pick_checkpoint(run_dir, step)
    recipe = load_recipe(checkpoint_recipe_file(checkpoint))
    is_lora = recipe.method != "full"
    if merge and not is_lora:
        raise DeepfleetError("--merge only applies to LoRA runs; this run trained every weight",
                             where=str(checkpoint), fix="drop --merge")
    state = {key: value.float() for key, value in consolidated_state_dict(checkpoint).items()}
    tokenizer = load_tokenizer(recipe.model)
    model = build_model(recipe, tokenizer, ds_config={}, precision="fp32", device=torch.device("cpu")).model
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {key for key in missing if "lm_head" in key and model.config.tie_word_embeddings} \
        if hasattr(model, "config") else set()
    if unexpected or set(missing) - tied:
        raise DeepfleetError(f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} "
                             f"unexpected keys (e.g. {(list(missing) + list(unexpected))[:2]})",
                             where=str(checkpoint), fix="export with the deepfleet version that trained it")
    if merge:
        model, is_lora = model.merge_and_unload(), False
    return write_model_dir(model, tokenizer, target, state_dict=None, is_lora=is_lora,
                           base_model_name=recipe.model.name,
                           save_base_weights=is_lora and recipe.model.name == TINY_MODEL_NAME,
                           run_info={"exported_from": str(checkpoint)})
