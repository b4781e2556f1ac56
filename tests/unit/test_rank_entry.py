"""The rank entry (`python -m deepfleet.train`) destroys the process group after a clean end, and only then."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError
from deepfleet.plan import recipe_io
from deepfleet.train import __main__ as rank_entry
from deepfleet.train import loop
from deepfleet.train.preemption import Preempted


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """`run_training` replaced by: join a one-rank gloo group, then `outcome()` (return or raise)."""
    monkeypatch.setattr(rank_entry, "claim_console", io.StringIO)
    monkeypatch.setattr(recipe_io, "load_recipe", lambda path: object())

    def use(outcome):
        def fake_run_training(recipe, rank_env, **_):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            return outcome()
        monkeypatch.setattr(loop, "run_training", fake_run_training)
    yield use
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_finished_rank_destroys_its_process_group(one_rank_group):
    one_rank_group(lambda: None)
    assert rank_entry.main(["--recipe", "r.yaml"]) == 0
    assert not dist.is_initialized()


def test_a_preempted_rank_destroys_its_process_group(one_rank_group):
    def preempted():
        raise Preempted(3, Path("ckpt/step-3"))
    one_rank_group(preempted)
    assert rank_entry.main(["--recipe", "r.yaml"]) == EXIT_PREEMPTED
    assert not dist.is_initialized()


def test_a_failed_rank_leaves_teardown_to_the_supervisor(one_rank_group, capsys):
    def failed():
        raise DeepfleetError("no rows", where="data", fix="add rows")
    one_rank_group(failed)
    assert rank_entry.main(["--recipe", "r.yaml"]) == 2
    assert dist.is_initialized()
    assert "no rows" in capsys.readouterr().err


def test_exit_rank_runs_exit_handlers_flushes_and_keeps_the_exit_code():
    script = ("import atexit, sys\n"
              "from deepfleet.train.distributed import exit_rank\n"
              "atexit.register(lambda: sys.stdout.write('handler ran;'))\n"
              "sys.stdout.write('buffered;')\n"
              "sys.stderr.write('to stderr;')\n"
              "exit_rank(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered;handler ran;", "to stderr;")
