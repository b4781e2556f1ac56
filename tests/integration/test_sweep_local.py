"""`deepfleet sweep` on 2 local ranks: a 4-trial sweep of the demo recipe, stopped by SIGTERM during its
second trial and run again (the first trial skipped, the second resumed from its checkpoint, the last
two run), ranked by validation loss; and trials that fail are recorded while the sweep goes on."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from training_fixtures import DEEPFLEET, REPO, run_cli, write_recipe

from deepfleet.sweep.grid import build_trials, parse_grid
from deepfleet.sweep.trial_runs import TrialRunner

pytestmark = pytest.mark.integration

DEMO = REPO / "src" / "deepfleet" / "assets" / "demo.yaml"
# ~0.08 s a step here: a checkpoint every 5 steps leaves seconds between trial 2's first checkpoint
# and its end for the test to stop it.
SWEEP = [str(DEMO), "train.max_steps=40", "checkpoint.every_steps=5", "logging.tensorboard=false",
         "--grid", "train.lr=1e-3,3e-3", "--grid", "train.warmup=2,10", "--out", "sweep"]


def wait_for(condition, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_four_trial_sweep_interrupted_and_resumed(tmp_path):
    manifest_path = tmp_path / "sweep" / "sweep.json"
    process = subprocess.Popen([DEEPFLEET, "sweep", *SWEEP], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(manifest_path.exists, 60, process)
    first, second, third, fourth = (t["id"] for t in json.loads(manifest_path.read_text())["trials"])
    sweep = tmp_path / "sweep"
    wait_for(lambda: list((sweep / "trials" / second / "checkpoints").glob("step-*/COMPLETE")), 240, process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 75, out[-3000:]
    statuses = {t: json.loads((sweep / "status" / f"{t}.json").read_text())["status"] for t in (first, second)}
    assert statuses == {first: "done", second: "interrupted"}, out[-3000:]
    assert not (sweep / "status" / f"{third}.json").exists() and not (sweep / "trials" / third).exists()
    first_final = (sweep / "trials" / first / "final" / "model.safetensors").stat().st_mtime_ns

    done = run_cli("sweep", *SWEEP, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"# {first}: done before, skipped" in done.stdout
    assert f"# {second}: resumes from its checkpoint at step" in done.stdout
    assert f"[{second}] vm/[0]:resuming from " in done.stdout.replace(os.uname().nodename, "vm")
    assert (sweep / "trials" / first / "final" / "model.safetensors").stat().st_mtime_ns == first_final
    results = json.loads((sweep / "results.json").read_text())
    assert sorted(r["id"] for r in results) == sorted([first, second, third, fourth])
    assert all(r["status"] == "done" and r["steps"] == 40 and r["tokens_per_second"] > 0 for r in results)
    losses = [r["val_loss"] for r in results]
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert (sweep / "results.png").stat().st_size > 10_000
    assert (sweep / "results.md").read_text().count("| done |") == 4


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", model="builtin:tiny", output_dir=str(tmp_path / "out"),
                          train={"max_steps": 2, "global_batch": 4, "micro_batch": 2})
    done = run_cli("sweep", str(recipe), "--grid", "data.train=missing-a.jsonl,missing-b.jsonl", cwd=tmp_path,
                   timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "sweep" / "results.json").read_text())
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert [r["exit_code"] for r in results] == [2, 2]
    assert "missing-a.jsonl" in results[0]["note"] and "missing-b.jsonl" in results[1]["note"]
    again = run_cli("sweep", str(recipe), "--grid", "data.train=missing-a.jsonl,missing-b.jsonl", cwd=tmp_path,
                    timeout=300)
    assert again.returncode == 1 and again.stdout.count("failed before, skipped") == 2, again.stdout


def test_parallel_runner_gives_each_running_trial_a_free_group(tmp_path):
    """3 trials, 2 groups: two start at once on groups 0 and 1, the third on a group freed; each
    child is the real `deepfleet train` (failing fast here: no such recipe), its ending recorded."""
    trials = build_trials(None, [], parse_grid(["train.lr=1,2,3"]), range(3))
    started, recorded = [], {}

    def argv_for(trial, group):
        started.append((trial.id, group, sorted(r.group for r in runner.running)))
        return [str(tmp_path / f"missing-{trial.id}.yaml")]

    runner = TrialRunner(argv_for=argv_for, log_for=lambda trial: tmp_path / "logs" / f"{trial.id}.log",
                         record=lambda trial, status: recorded.__setitem__(trial.id, status), groups=2,
                         write=lambda line: None)
    runner.run(trials)
    assert started[:2] == [(trials[0].id, 0, []), (trials[1].id, 1, [0])]   # the second beside the first
    third_group, busy = started[2][1], started[2][2]
    assert len(busy) <= 1 and third_group not in busy and third_group in (0, 1)
    assert {t: (s.status, s.exit_code) for t, s in recorded.items()} == {t.id: ("failed", 2) for t in trials}
    assert all("cannot read recipe" in recorded[t.id].error for t in trials)
    assert "cannot read recipe" in (tmp_path / "logs" / f"{trials[2].id}.log").read_text()
