"""The local torchrun command, tested as strings, and how rank errors become one line."""

from pathlib import Path

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.launch.local import (LocalLaunch, cpu_threads_per_rank, create_run_dir, default_nproc,
                                    last_exception_line, local_torchrun_command, new_run_dir, rank_errors,
                                    render_command, run_local)


def launch(**changes) -> LocalLaunch:
    values = dict(nproc=2, run_dir=Path("/runs/demo-1"), python="/venv/bin/python", cpu_threads=1)
    return LocalLaunch(**{**values, **changes})


def test_command_runs_the_rank_program_under_torchrun_bound_to_loopback():
    argv, env = local_torchrun_command(launch())
    assert " ".join(argv) == (
        "/venv/bin/python -m deepfleet.launch.bound_torchrun --nnodes=1 --node-rank=0 --master-addr=127.0.0.1 "
        "--master-port=0 --nproc-per-node=2 --shutdown-timeout=60 --no-python "
        "/venv/bin/python -m deepfleet.train --recipe /runs/demo-1/recipe.json")
    assert env == {"DEEPFLEET_RUN_DIR": "/runs/demo-1", "OMP_NUM_THREADS": "1"}


def test_gpu_launch_leaves_threads_alone_and_carries_recipe_env():
    argv, env = local_torchrun_command(launch(nproc=8, cpu_threads=None, extra_env={"NCCL_DEBUG": "WARN"}))
    assert "--nproc-per-node=8" in argv
    assert "OMP_NUM_THREADS" not in env and env["NCCL_DEBUG"] == "WARN"


def test_dry_run_line_masks_secrets_and_quotes():
    argv, env = local_torchrun_command(launch(extra_env={"HF_TOKEN": "hf_abc123", "WANDB_API_KEY": "k-999",
                                                         "NOTE": "two words"}))
    line = render_command(argv, env)
    assert "hf_abc123" not in line and "k-999" not in line
    assert "HF_TOKEN='****'" in line and "WANDB_API_KEY='****'" in line
    assert "NOTE='two words'" in line
    assert line.startswith("env DEEPFLEET_RUN_DIR=/runs/demo-1 ")
    assert line.endswith("--recipe /runs/demo-1/recipe.json")


def test_default_ranks_and_threads():
    assert default_nproc(gpus=0) == 2
    assert default_nproc(gpus=4) == 4
    assert cpu_threads_per_rank(cpu_count=2, nproc=2) == 1
    assert cpu_threads_per_rank(cpu_count=16, nproc=2) == 8
    assert cpu_threads_per_rank(cpu_count=1, nproc=4) == 1


def test_rank_errors_are_deduplicated_in_rank_order(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank-10.txt").write_text("error: b\n")
    (errors / "rank-1.txt").write_text("error: data.train: a (fix: x)\n")
    (errors / "rank-0.txt").write_text("error: data.train: a (fix: x)\n")
    assert rank_errors(tmp_path) == ["error: data.train: a (fix: x)", "error: b"]
    assert rank_errors(tmp_path / "missing") == []


def test_last_exception_line_skips_torchrun_wrapper(tmp_path):
    log = tmp_path / "torchrun.log"
    log.write_text("[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: boom 1\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert last_exception_line(log) == "RuntimeError: boom 1"


def test_run_local_turns_a_rank_error_file_into_one_clean_error(tmp_path):
    # A fake "python" that writes a rank error file and fails, standing in for torchrun.
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\nmkdir -p \"$DEEPFLEET_RUN_DIR/errors\"\n"
                    "echo 'error: model.name: no such model (fix: check it)' > \"$DEEPFLEET_RUN_DIR/errors/rank-0.txt\"\n"
                    "echo 'Traceback noise' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(DeepfleetError) as info:
        run_local(launch(python=str(fake), run_dir=tmp_path / "run"))
    assert info.value.exit_code == 2
    assert info.value.render() == "error: model.name: no such model (fix: check it)"
    assert not (tmp_path / "run").exists(), "the line says it all: bad input leaves no run state behind"


def test_run_dirs_are_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPFLEET_RUNS_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_dir = new_run_dir(Path("/somewhere/out"))
    assert run_dir.parent == tmp_path / "cache" / "deepfleet" / "runs" and run_dir.name.startswith("out-")
    create_run_dir(run_dir)
    assert run_dir.stat().st_mode & 0o777 == 0o700 and run_dir.parent.stat().st_mode & 0o777 == 0o700
    with pytest.raises(FileExistsError):
        create_run_dir(run_dir)   # never reuses a directory that is already there
