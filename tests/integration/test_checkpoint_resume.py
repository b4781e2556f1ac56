"""Checkpoints on 2 CPU ranks through `deepfleet train`: SIGTERM to one rank mid-run checkpoints and exits 75;
the same command resumes and reproduces the uninterrupted run's per-step losses within 1e-6 (ZeRO 0, 1, 2)."""

import json
import os
import signal
import subprocess
import time

import pytest

from deepfleet.train.metrics import read_metrics

from training_fixtures import DEEPFLEET, PYTHON, REPO, write_recipe, write_task_data

pytestmark = pytest.mark.integration

STEPS = 16


def recipe_for(tmp_path, name, train_file, stage=2):
    return write_recipe(
        tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
        data={"train": [str(train_file)], "max_length": 128},
        # accumulation 4 per rank, so a resume must also land on a step boundary of the accumulation
        train={"max_steps": STEPS, "global_batch": 16, "micro_batch": 2, "lr": 3e-3, "warmup": 3, "seed": 11},
        deepspeed={"zero": stage}, checkpoint={"every_steps": 5, "keep": 2},
        logging={"peak_tflops": 0.05, "tensorboard": False})


def start(tmp_path, recipe):
    env = dict(os.environ)
    return subprocess.Popen([DEEPFLEET, "train", str(recipe), "--nproc", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_losses(output_dir):
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def process_tree(pid):
    """`pid` and every process below it, from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = open(f"/proc/{current}/task/{current}/children").read().split()
        except OSError:
            continue
        found.append(current)
        todo += [int(child) for child in children]
    return found


def rank_pids(pid):
    """The rank processes under `deepfleet train` (its host agent's children)."""
    found = []
    for current in process_tree(pid):
        try:
            command = open(f"/proc/{current}/cmdline").read()
        except OSError:
            continue
        if command.split("\0")[1:3] == ["-m", "deepfleet.train"]:
            found.append(current)
    assert len(found) == 2, found
    return sorted(found)


def wait_for_step(metrics_path, step, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics_path.is_file() and any(r["step"] >= step for r in read_metrics(metrics_path)):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


# DeepSpeed saves each stage its own way: ZeRO-0 the whole optimizer in the model states, 1 and 2 a partition per rank
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_sigterm_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path, stage):
    train_file, _ = write_task_data(tmp_path / "data", n_train=800)
    reference = start(tmp_path, recipe_for(tmp_path, "straight", train_file, stage))
    interrupted_recipe = recipe_for(tmp_path, "interrupted", train_file, stage)
    interrupted = start(tmp_path, interrupted_recipe)
    out = tmp_path / "interrupted"
    wait_for_step(out / "metrics.jsonl", 6, interrupted)
    # SIGTERM to one rank only: the other learns of it through the per-step all-gather.
    os.kill(rank_pids(interrupted.pid)[-1], signal.SIGTERM)
    stdout, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 75, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by signal after step" in lines[0] and "Traceback" not in stderr
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    assert 6 <= stopped_at < STEPS
    assert not (out / "final").exists()
    marker = json.loads((out / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").read_text())
    assert marker["step"] == stopped_at
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert len(kept) == 2 and kept[-1] == stopped_at  # keep: 2 (the step-5 or step-10 save, and this one)

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


def test_kill_during_save_keeps_the_previous_checkpoint_and_resume_rules(tmp_path):
    train_file, _ = write_task_data(tmp_path / "data", n_train=200)
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=str(out), data={"train": [str(train_file)], "max_length": 128},
        train={"max_steps": 6, "global_batch": 4, "micro_batch": 2, "warmup": 1},
        checkpoint={"every_steps": 2, "keep": 3}, logging={"peak_tflops": 0.05, "tensorboard": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(REPO / "tests" / "integration" / "slow_save_rank.py"), str(recipe)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "SAVING").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert (out / "SAVING").exists(), "the step-4 save never started"
    for pid in process_tree(job.pid):    # torchrun gives each rank a session of its own: killpg would miss them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    assert (out / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert (out / "checkpoints" / "step-4" / "engine").is_dir()            # shards written...
    assert not (out / "checkpoints" / "step-4" / "COMPLETE").exists()     # ...but never marked

    def train(*args):
        return subprocess.run([DEEPFLEET, "train", str(recipe), *args], cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ), timeout=400)

    changed = train("train.global_batch=8")
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert changed.returncode == 2 and len(lines) == 1, changed.stdout + changed.stderr
    assert "global_batch: checkpoint has 4, this run has 8" in lines[0] and "Traceback" not in changed.stderr

    resumed = train()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'step-2'} (step 2 of 6)" in resumed.stdout
    assert f"removed incomplete checkpoint {out / 'checkpoints' / 'step-4'}" in resumed.stdout
    assert sorted(train_losses(out)) == list(range(1, 7))
    assert (out / "checkpoints" / "step-4" / "COMPLETE").is_file() and (out / "final").is_dir()

    fresh = train("train.max_steps=2", "--no-resume")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "resume is off: starting over" in fresh.stdout and "resuming from" not in fresh.stdout
    assert list(out.glob("checkpoints.before-*/step-6/COMPLETE"))
    assert sorted(train_losses(out)) == [1, 2]
