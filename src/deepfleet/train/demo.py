"""What `deepfleet demo` measures: held-out exact match of the untrained and the trained built-in model."""

from __future__ import annotations

from pathlib import Path

import torch

from deepfleet.plan.recipe import Recipe
from deepfleet.train.evaluate import HeldoutReport, evaluate_heldout
from deepfleet.train.generate import load_for_generation
from deepfleet.train.metrics import METRICS_FILE, read_metrics
from deepfleet.train.model import build_model
from deepfleet.train.tokenizer import load_tokenizer

HELDOUT_SEED = 1234


def evaluate_base_model(recipe: Recipe, *, n: int) -> HeldoutReport:
    """The model the ranks start from (same seed, same config), before any training."""
    tokenizer = load_tokenizer(recipe.model)
    built = build_model(recipe, tokenizer, ds_config={}, precision="fp32", device=torch.device("cpu"))
    return evaluate_heldout(built.model.eval(), tokenizer, n=n, seed=HELDOUT_SEED)


def evaluate_saved_model(model_dir: Path, *, n: int) -> HeldoutReport:
    model, tokenizer = load_for_generation(model_dir)
    return evaluate_heldout(model, tokenizer, n=n, seed=HELDOUT_SEED)


def training_loop_seconds(output_dir: Path) -> float:
    """Seconds spent in optimizer steps (slowest rank), from metrics.jsonl."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return 0.0
    return sum(r["step_seconds"] for r in read_metrics(path) if r.get("kind") == "train")
