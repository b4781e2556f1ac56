"""2-rank CPU training (real torchrun + DeepSpeed) with the chunked loss on and off: the same losses at
ZeRO-2 and at ZeRO-3, where the output layer's weight is partitioned and gathered only inside its call."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from deepfleet.train.metrics import read_metrics

from training_fixtures import PYTHON, REPO, write_recipe, write_task_data

pytestmark = pytest.mark.integration

STEPS = 3
STAGES = (2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunked")
    train, validation = write_task_data(root / "data", n_train=120, n_validation=8)
    recipes = [write_recipe(
        root / f"zero{stage}-{chunked}.yaml", model="builtin:tiny", method="full",
        data={"train": [str(train)], "max_length": 128, "validation": {"files": [str(validation)]}},
        train={"max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "warmup": 1, "lr": 3e-3, "seed": 3,
               "chunked_loss": chunked},
        deepspeed={"zero": stage}, logging={"peak_tflops": 0.05, "tensorboard": False},
        output_dir=str(root / f"zero{stage}-{chunked}"))
        for stage in STAGES for chunked in (False, True)]
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "integration" / "rank_chunked_loss.py"), *map(str, recipes)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_chunked_loss_trains_like_the_plain_loss(runs, stage):
    results, losses = {}, {}
    for chunked in (False, True):
        out = runs / f"zero{stage}-{chunked}"
        results[chunked] = json.loads((out / "result.json").read_text())
        losses[chunked] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert results[True]["loss"].startswith("chunked cross-entropy (16 tokens per chunk")
    assert results[False]["loss"] == "plain cross-entropy (train.chunked_loss: false)"
    assert len(losses[True]) == STEPS
    assert losses[True] == pytest.approx(losses[False], abs=1e-5, rel=0)
    assert results[True]["val_loss"] == pytest.approx(results[False]["val_loss"], abs=1e-5, rel=0)
