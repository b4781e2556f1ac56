"""Run by torchrun in the kill-during-save test: the per-rank program, with the flush of one
checkpoint (step-4) slowed down so the test can SIGKILL the job while that save is in progress."""

import os
import sys
import time
from pathlib import Path

from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train import checkpoint
from deepfleet.train.distributed import RankEnv, exit_rank
from deepfleet.train.loop import run_training

SLOW_STEP_DIR = "step-4"

flush = checkpoint._fsync_tree


def slow_flush(path: Path) -> None:
    if path.name == SLOW_STEP_DIR:
        (path.parent.parent / "SAVING").write_text(str(os.getpid()))
        time.sleep(300)
    flush(path)


checkpoint._fsync_tree = slow_flush

if __name__ == "__main__":
    run_training(load_recipe(sys.argv[1]), RankEnv.from_environ())
    exit_rank(0)
