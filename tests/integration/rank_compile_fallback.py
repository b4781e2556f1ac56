"""Run by torchrun in test_compiled_training.py: `train.compile` falls back on rank 1 alone.

Rank 1 gets a C++ compiler that does not exist (and its own inductor cache, so it cannot load rank 0's kernels),
from the start or only for the final validation (`train` or `validation` after the recipe); then both ranks
train the recipe under `auto`'s fallback rules."""

import os
import sys

RANK = os.environ["RANK"]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], f"rank{RANK}")

import torch._inductor.config  # noqa: E402

from deepfleet.plan.recipe_io import load_recipe  # noqa: E402
from deepfleet.train import loop  # noqa: E402
from deepfleet.train.distributed import RankEnv, exit_rank  # noqa: E402


def without_a_compiler() -> None:
    torch._inductor.config.cpp.cxx = (None, "/nonexistent/g++")


def validation_loss_without_a_compiler(run):
    without_a_compiler()
    return validation_loss(run)


if __name__ == "__main__":
    recipe_path, failing_phase = sys.argv[1:]
    if RANK == "1" and failing_phase == "train":
        without_a_compiler()
    if RANK == "1" and failing_phase == "validation":
        validation_loss = loop.validation_loss
        loop.validation_loss = validation_loss_without_a_compiler
    run = loop.build_training_run(load_recipe(recipe_path), RankEnv.from_environ())
    run.compiled.requested = "auto"     # compiled (the tiny model is below auto's size), with auto's fallback
    loop.train_and_save(run)
    exit_rank(0)
