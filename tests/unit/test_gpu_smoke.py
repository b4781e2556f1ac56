"""scripts/gpu_smoke.sh on a machine without a GPU: one `skip:` line naming why, exit 0.

(Its `--device cpu` development run takes minutes, so it is not part of the suite.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the whole smoke test")
def test_gpu_smoke_skips_in_one_line_without_a_gpu():
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DEEPFLEET_PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("skip: no CUDA GPU here (") and done.stdout.count("\n") == 1, done.stdout
    assert done.stdout.rstrip().endswith(")") and len(done.stdout) > len("skip: no CUDA GPU here ()\n"), done.stdout
