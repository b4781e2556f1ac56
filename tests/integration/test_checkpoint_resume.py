"""Checkpoints on 2 CPU ranks through `deepfleet train`: SIGTERM mid-run checkpoints and exits 75;
the same command resumes and reproduces the uninterrupted run's per-step losses within 1e-6."""

import json
import os
import signal
import subprocess
import time

import pytest

from deepfleet.train.metrics import read_metrics

from training_fixtures import DEEPFLEET, write_recipe, write_task_data

pytestmark = pytest.mark.integration

STEPS = 24


def recipe_for(tmp_path, name, train_file):
    return write_recipe(
        tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
        data={"train": [str(train_file)], "max_length": 128},
        # accumulation 4 per rank, so a resume must also land on a step boundary of the accumulation
        train={"max_steps": STEPS, "global_batch": 16, "micro_batch": 2, "lr": 3e-3, "warmup": 3, "seed": 11},
        deepspeed={"zero": 2}, checkpoint={"every_steps": 5, "keep": 2},
        logging={"peak_tflops": 0.05, "tensorboard": False})


def start(tmp_path, recipe):
    env = {**os.environ, "DEEPFLEET_RUNS_ROOT": str(tmp_path / "run-state")}
    return subprocess.Popen([DEEPFLEET, "train", str(recipe), "--nproc", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_losses(output_dir):
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def wait_for_step(metrics_path, step, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics_path.is_file() and any(r["step"] >= step for r in read_metrics(metrics_path)):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


def test_sigterm_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path):
    train_file, _ = write_task_data(tmp_path / "data", n_train=800)
    reference = start(tmp_path, recipe_for(tmp_path, "straight", train_file))
    interrupted_recipe = recipe_for(tmp_path, "interrupted", train_file)
    interrupted = start(tmp_path, interrupted_recipe)
    out = tmp_path / "interrupted"
    wait_for_step(out / "metrics.jsonl", 7, interrupted)
    interrupted.send_signal(signal.SIGTERM)
    stdout, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 75, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by signal after step" in lines[0] and "Traceback" not in stderr
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    assert 7 <= stopped_at < STEPS
    assert not (out / "final").exists()
    marker = json.loads((out / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").read_text())
    assert marker["step"] == stopped_at
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert len(kept) == 2 and kept[-1] == stopped_at  # keep: 2

    # A save that died half-way (no marker, larger step) must be ignored and cleaned up.
    (out / "checkpoints" / f"step-{stopped_at + 1}" / "engine").mkdir(parents=True)

    resumed = start(tmp_path, interrupted_recipe)
    stdout, stderr = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, stdout + stderr
    assert f"resuming from {out / 'checkpoints' / f'step-{stopped_at}'}" in stdout
    assert "removed incomplete checkpoint" in stdout
    assert not (out / "checkpoints" / f"step-{stopped_at + 1}").exists()
    assert (out / "final" / "model.safetensors").is_file()

    stdout, stderr = reference.communicate(timeout=400)
    assert reference.returncode == 0, stdout + stderr
    straight, continued = train_losses(tmp_path / "straight"), train_losses(out)
    assert sorted(straight) == sorted(continued) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(straight[step] - continued[step]) <= 1e-6, (step, straight[step], continued[step])
    assert straight[STEPS] < straight[1] - 0.5


def test_resume_refuses_a_changed_run_and_no_resume_starts_over(tmp_path):
    train_file, _ = write_task_data(tmp_path / "data", n_train=200)
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), data={"train": [str(train_file)], "max_length": 128},
        train={"max_steps": 4, "global_batch": 4, "micro_batch": 2, "warmup": 1},
        checkpoint={"every_steps": 2}, logging={"peak_tflops": 0.05, "tensorboard": False})
    env = {**os.environ, "DEEPFLEET_RUNS_ROOT": str(tmp_path / "run-state")}

    def train(*args):
        return subprocess.run([DEEPFLEET, "train", str(recipe), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)

    first = train()
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "COMPLETE").is_file()
    changed = train("train.global_batch=8")
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert changed.returncode == 2 and len(lines) == 1, changed.stdout + changed.stderr
    assert "global_batch: checkpoint has 4, this run has 8" in lines[0] and "Traceback" not in changed.stderr
    fresh = train("train.global_batch=8", "--no-resume")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "resume is off: starting over" in fresh.stdout and "resuming from" not in fresh.stdout
    assert list((tmp_path / "out").glob("checkpoints.before-*/step-2/COMPLETE"))
