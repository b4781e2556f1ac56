"""Run by torchrun in test_compiled_training.py: `train.compile` falls back on rank 1 alone.

Rank 1 gets a C++ compiler that does not exist (and its own inductor cache, so it cannot load rank 0's kernels),
then both ranks train the recipe under `auto`'s fallback rules."""

import os
import sys

RANK = os.environ["RANK"]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], f"rank{RANK}")

import torch._inductor.config  # noqa: E402

from deepfleet.plan.recipe_io import load_recipe  # noqa: E402
from deepfleet.train.distributed import RankEnv  # noqa: E402
from deepfleet.train.loop import build_training_run, train_and_save  # noqa: E402

if __name__ == "__main__":
    if RANK == "1":
        torch._inductor.config.cpp.cxx = (None, "/nonexistent/g++")
    run = build_training_run(load_recipe(sys.argv[1]), RankEnv.from_environ())
    run.compiled.requested = "auto"     # compiled (the tiny model is below auto's size), with auto's fallback
    train_and_save(run)
