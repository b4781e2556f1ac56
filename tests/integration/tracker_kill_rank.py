"""Run by torchrun in the tracker kill+resume test: the per-rank program, with rank 0 SIGKILLing the
whole job (its process group) right after it has logged step $KILL_AFTER_STEP, as a crash would."""

import os
import signal
import sys

from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train import metrics
from deepfleet.train.distributed import RankEnv, exit_rank
from deepfleet.train.loop import run_training

KILL_AFTER_STEP = int(os.environ["KILL_AFTER_STEP"])
write_step = metrics.MetricsWriter.write_step


def write_step_then_die(self, step_metrics):
    write_step(self, step_metrics)
    if step_metrics.step == KILL_AFTER_STEP:
        os.killpg(os.getpgid(0), signal.SIGKILL)


metrics.MetricsWriter.write_step = write_step_then_die

if __name__ == "__main__":
    run_training(load_recipe(sys.argv[1]), RankEnv.from_environ())
    exit_rank(0)
