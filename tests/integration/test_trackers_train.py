"""Experiment trackers on real training runs (2 CPU ranks, the tiny model), with the real libraries offline:
W&B in offline mode (its run files read back) and a local `mlflow server` (queried with MlflowClient).
A stop+resume and a kill+resume continue the same tracker runs and leave every step in them once; a
tracker server lost mid-run costs one warning line and nothing else."""

import json
import os
import signal
import subprocess
import time

import pytest

from deepfleet.train.metrics import read_metrics
from deepfleet.train.tracker_set import TRACKERS_FILE, Trackers
from deepfleet.train.trackers import TrackerRun

from tracker_fixtures import mlflow_server, read_wandb_offline_runs, stop_server
from training_fixtures import DEEPFLEET, PYTHON, REPO, write_recipe, write_task_data

pytestmark = pytest.mark.integration

STEPS = 6
# The stopped run needs steps left when the SIGTERM (sent at the first step) reaches the ranks: a step
# of the tiny model can take 0.04 s, and 6 of them were over before it did.
STOPPED_STEPS = 40


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as (uri, _):
        yield uri


def tracked_recipe(tmp_path, name, trackers, steps=STEPS, **logging):
    train_file, validation_file = write_task_data(tmp_path / "data", n_train=120, n_validation=8)
    return write_recipe(
        tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
        data={"train": [str(train_file)], "max_length": 96, "validation": {"files": [str(validation_file)],
                                                                           "every_steps": 3}},
        train={"max_steps": steps, "global_batch": 4, "micro_batch": 2, "warmup": 1, "seed": 5},
        deepspeed={"zero": 2}, checkpoint={"every_steps": 2, "keep": 3},
        logging={"peak_tflops": 0.05, "trackers": trackers, "run_name": name, "tags": ["it", "tiny"],
                 "project": f"deepfleet-{name}", **logging})


def tracker_env(mlflow_uri):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("WANDB_", "MLFLOW_"))}
    return {**env, "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}


def deepfleet_train(recipe, env, **popen):
    return subprocess.Popen([DEEPFLEET, "train", str(recipe), "--nproc", "2"], cwd=recipe.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def train_records(output_dir):
    return {r["step"]: r for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def validation_steps(output_dir):
    """(A stop right after a validation step's train step skips that validation: metrics.jsonl says which ran.)"""
    return [r["step"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "validation"]


def mlflow_run(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_stop_and_resume_continue_one_wandb_and_one_mlflow_run(tmp_path, mlflow_uri):
    recipe = tracked_recipe(tmp_path, "stopped", ["wandb", "mlflow"], steps=STOPPED_STEPS)
    out = tmp_path / "stopped"
    env = tracker_env(mlflow_uri)
    first = deepfleet_train(recipe, env)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not train_records(out):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)   # forwarded to every rank: finish the step, checkpoint, exit 75
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 75, stdout + stderr
    stopped_at = max(train_records(out))
    assert stopped_at < STOPPED_STEPS
    ids = json.loads((out / TRACKERS_FILE).read_text())

    second = deepfleet_train(recipe, env)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stdout + stderr
    assert not [line for line in (stdout + stderr).splitlines() if "warning" in line and "tracker" in line]
    records = train_records(out)
    assert sorted(records) == list(range(1, STOPPED_STEPS + 1))
    assert json.loads((out / TRACKERS_FILE).read_text())["wandb"]["run"] == ids["wandb"]["run"]

    before, after = read_wandb_offline_runs(out)
    assert before.run_id == after.run_id == ids["wandb"]["run"]["run_id"]
    assert before.steps("train/loss") == list(range(1, stopped_at + 1))
    assert after.steps("train/loss") == list(range(stopped_at + 1, STOPPED_STEPS + 1))
    assert sorted(before.steps("val_loss") + after.steps("val_loss")) == validation_steps(out)
    for row in before.history + after.history:
        if "train/loss" in row:
            assert row["train/loss"] == pytest.approx(records[row["_step"]]["loss"], abs=1e-9)
            assert row["train/tokens"] == records[row["_step"]]["tokens"]
    assert (after.name, after.tags, after.project) == ("stopped", ["it", "tiny"], "deepfleet-stopped")
    assert after.config["recipe"]["train"]["max_steps"] == STOPPED_STEPS and "env" not in after.config["recipe"]
    assert after.config["deepspeed"]["zero_optimization"]["stage"] == 2
    assert before.exit_code == 75 and after.exit_code == 0
    final = (out / "final").resolve()
    assert after.summary["final_model_dir"] == str(final)
    [model] = [a for a in after.artifacts if a["type"] == "model"]
    assert model["refs"] and all(ref.startswith(final.as_uri()) for ref in model["refs"])

    client, run = mlflow_run(mlflow_uri, "deepfleet-stopped")
    assert run.info.run_id == ids["mlflow"]["run"]["run_id"] and run.info.status == "FINISHED"
    assert [step for step, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, STOPPED_STEPS + 1))
    assert [step for step, _ in history(client, run.info.run_id, "val_loss")] == validation_steps(out)
    for step, value in history(client, run.info.run_id, "train/loss"):
        assert value == pytest.approx(records[step]["loss"], abs=1e-9)
    assert run.data.params["recipe.train.max_steps"] == str(STOPPED_STEPS)
    assert run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert run.data.tags["mlflow.runName"] == "stopped" and {"it", "tiny"} <= set(run.data.tags)
    assert run.data.tags["deepfleet.final_model_dir"] == str(final)


def test_kill_and_resume_send_no_step_twice(tmp_path, mlflow_uri):
    recipe = tracked_recipe(tmp_path, "killed", ["tensorboard", "mlflow"], upload_model=True)
    out = tmp_path / "killed"
    env = tracker_env(mlflow_uri)
    crash = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(REPO / "tests" / "integration" / "tracker_kill_rank.py"), str(recipe)],
                           env={**env, "KILL_AFTER_STEP": "5"}, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert crash.returncode != 0
    first_attempt = train_records(out)
    assert sorted(first_attempt) == [1, 2, 3, 4, 5]          # logged up to 5, checkpoint at 4
    assert (out / "checkpoints" / "step-4" / "COMPLETE").is_file()

    resumed = deepfleet_train(recipe, env)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout + stderr
    assert "resuming from" in stdout and "(step 4 of 6)" in stdout

    client, run = mlflow_run(mlflow_uri, "deepfleet-killed")
    losses = history(client, run.info.run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]   # step 5, trained twice, logged once
    assert dict(losses)[5] == pytest.approx(first_attempt[5]["loss"], abs=1e-9)   # the first attempt's
    assert [step for step, _ in history(client, run.info.run_id, "val_loss")] == [3, 6]
    assert run.info.status == "FINISHED"
    assert sorted(train_records(out)) == list(range(1, STEPS + 1))
    uploaded = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in uploaded and "model/config.json" in uploaded   # upload_model: true

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    steps = [event.step for event in board.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1))            # the first attempt's step 5 purged, the retrained one kept


def test_mlflow_server_lost_mid_run_costs_one_warning_line(tmp_path):
    warnings = []
    with mlflow_server(tmp_path / "mlflow") as (uri, server):
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            run = TrackerRun(output_dir=tmp_path / "out", run_name="lost", project="deepfleet-lost")
            (tmp_path / "out").mkdir()
            trackers = Trackers.open(("mlflow",), run, warn=warnings.append)
            trackers.log({"kind": "train", "step": 1, "loss": 2.0})
            assert warnings == [] and [t.name for t in trackers.active] == ["mlflow"]
            stop_server(server)
            started = time.monotonic()
            for step in range(2, 6):
                trackers.log({"kind": "train", "step": step, "loss": 1.0})
            trackers.finish(None)
            seconds = time.monotonic() - started
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow tracker stopped ("), warnings
    assert trackers.active == [] and seconds < 30
