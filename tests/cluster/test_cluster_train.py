"""`deepfleet train --fleet` across namespace hosts: the same losses as one host, restarts, no shared disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from namespace_cluster import HostSpec, fleet_yaml_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from training_fixtures import DEEPFLEET, write_recipe, write_task_data  # noqa: E402

from deepfleet.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.cluster

# Two ranks either way, the same rows per rank and a 2-way gloo all-reduce (a + b is the same sum
# in any order), so the only difference is where the ranks run: losses should agree to float
# rounding. 1e-5 leaves room for thread-count effects in CPU matmuls, nothing more.
LOSS_TOLERANCE = 1e-5


def recipe_for(tmp: Path, *, stage: int, output: str, steps: int = 6, batch: dict | None = None, **extra) -> Path:
    train, _ = write_task_data(tmp / "data", n_train=800, n_validation=8)
    return write_recipe(
        tmp / f"{output}.yaml", model="builtin:tiny", method="full",
        data={"train": [str(train)], "max_length": 64, "packing": True},
        train={"max_steps": steps, "global_batch": 8, "micro_batch": 4, "lr": 2e-3, "warmup": 1, "seed": 3,
               **(batch or {})},
        deepspeed={"zero": stage}, logging={"tensorboard": False},
        env={"OMP_NUM_THREADS": "1"}, output_dir=str(tmp / output), **extra)


def run(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([DEEPFLEET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if r["kind"] == "train"}


def rank_pids(cluster, name: str) -> list[int]:
    return cluster.pids_running(name, b"deepfleet.train")


CHECKPOINTS = {"checkpoint": {"every_steps": 5, "keep": 2}}
# Long enough that a fault injected after step 4 lands mid-run even on an idle machine (~0.05 s a step).
LONG_RUN = 45


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    """An uninterrupted run on one host, 2 ranks: what every interrupted run must reach."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = recipe_for(tmp, stage=2, output="reference", steps=LONG_RUN, **CHECKPOINTS)
    done = run("train", str(recipe), "--nproc", "2", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return losses(tmp / "reference")


def assert_same_losses(one: dict[int, float], two: dict[int, float], steps: int) -> None:
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= LOSS_TOLERANCE, (step, one[step], two[step])


def test_two_host_zero2_training_matches_one_host(namespace_cluster, tmp_path, reference_losses):
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, ["h1", "h2"]))
    recipe = recipe_for(tmp_path, stage=2, output="multi", steps=LONG_RUN, **CHECKPOINTS)
    fleet = run("train", str(recipe), "--fleet", "fleet.yaml", cwd=tmp_path)
    assert fleet.returncode == 0, fleet.stdout[-3000:] + fleet.stderr[-2000:]
    assert_same_losses(reference_losses, losses(tmp_path / "multi"), LONG_RUN)
    assert (tmp_path / "multi" / "final" / "config.json").is_file()
    assert (tmp_path / "multi" / "logs" / "attempt-0" / "h2.log").is_file()


def test_two_host_zero3_training_matches_one_host(namespace_cluster, tmp_path):
    # Not ./fleet.yaml: `deepfleet train` would find it and the "local" run would use both hosts.
    (tmp_path / "hosts.yaml").write_text(fleet_yaml_text(namespace_cluster, ["h1", "h2"]))
    local = run("train", str(recipe_for(tmp_path, stage=3, output="local")), "--nproc", "2", cwd=tmp_path)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    fleet = run("train", str(recipe_for(tmp_path, stage=3, output="multi")), "--fleet", "hosts.yaml", cwd=tmp_path)
    assert fleet.returncode == 0, fleet.stdout[-3000:] + fleet.stderr[-2000:]
    assert_same_losses(losses(tmp_path / "local"), losses(tmp_path / "multi"), 6)
    assert (tmp_path / "multi" / "final" / "config.json").is_file()


def test_hosts_with_different_rank_counts_train_as_one_job(namespace_cluster, tmp_path):
    """Seed 001's uneven fleet in small: 2 ranks on h1 and 1 on h2 give the losses of 3 ranks on one host."""
    h1 = namespace_cluster.host("h1").address
    text = fleet_yaml_text(namespace_cluster, ["h1", "h2"]).replace(f"address: {h1}}}", f"address: {h1}, slots: 2}}")
    (tmp_path / "uneven.yaml").write_text(text)
    batch = {"global_batch": 12}
    local = run("train", str(recipe_for(tmp_path, stage=2, output="local", batch=batch)), "--nproc", "3", cwd=tmp_path)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    fleet = run("train", str(recipe_for(tmp_path, stage=2, output="multi", batch=batch)), "--fleet", "uneven.yaml",
                cwd=tmp_path)
    assert fleet.returncode == 0, fleet.stdout[-3000:] + fleet.stderr[-2000:]
    assert "(2+1 ranks)" in fleet.stdout
    assert_same_losses(losses(tmp_path / "local"), losses(tmp_path / "multi"), 6)
    ranks_on_h2 = (tmp_path / "multi" / "logs" / "attempt-0" / "h2.log").read_text()
    assert "[2]:" in ranks_on_h2 and "[0]:" not in ranks_on_h2   # global ranks 0, 1 on h1, then 2 on h2


def start_fleet_training(tmp_path: Path, cluster, *extra: str) -> subprocess.Popen:
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["h1", "h2"]))
    recipe = recipe_for(tmp_path, stage=2, output="interrupted", steps=LONG_RUN, **CHECKPOINTS)
    env = dict(os.environ)
    return subprocess.Popen([DEEPFLEET, "train", str(recipe), "--fleet", "fleet.yaml", *extra], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(tmp_path: Path, process: subprocess.Popen, step: int) -> None:
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(metrics))):
        assert time.monotonic() < deadline and process.poll() is None, f"training never reached step {step}"
        time.sleep(0.2)


def test_sigterm_to_launcher_checkpoints_every_rank_then_the_same_command_resumes(namespace_cluster, tmp_path,
                                                                                  reference_losses):
    process = start_fleet_training(tmp_path, namespace_cluster)
    wait_for_step(tmp_path, process, 4)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=200)
    assert process.returncode == 75, out[-3000:]
    assert "job preempted" in out
    assert not any(rank_pids(namespace_cluster, name) for name in ("h1", "h2")), "a rank survived the launcher"
    again = start_fleet_training(tmp_path, namespace_cluster)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out[-3000:]
    got = losses(tmp_path / "interrupted")
    last = reference_losses[LONG_RUN]
    assert max(got) == LONG_RUN and abs(last - got[LONG_RUN]) <= LOSS_TOLERANCE, (last, got[LONG_RUN])


def host_file_text(cluster, name: str, path: Path) -> str | None:
    """A file as host `name` sees it (inside its sshd's mount namespace), or None when absent."""
    sshd = cluster.host(name).sshd_pid_file.read_text().strip()
    done = subprocess.run(["nsenter", "-t", sshd, "-m", "cat", str(path)], capture_output=True, text=True, timeout=10)
    return done.stdout if done.returncode == 0 else None


def test_killed_rank_restarts_and_resumes_when_hosts_do_not_share_the_output_dir(cluster_factory, tmp_path,
                                                                                  reference_losses):
    """--max-restarts 1 after kill -9 of a rank, on per-host output dirs: the same final loss as no failure."""
    private = tmp_path / "node-local"
    cluster = cluster_factory([HostSpec(name=n, private_dirs=(str(private),)) for n in ("h1", "h2")])
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["h1", "h2"]))
    recipe = recipe_for(tmp_path, stage=2, output="unused", steps=LONG_RUN, **CHECKPOINTS)
    env = dict(os.environ)
    output = private / "out"
    process = subprocess.Popen([DEEPFLEET, "train", str(recipe), f"output_dir={output}", "--fleet", "fleet.yaml",
                                "--max-restarts", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while '"step": 7' not in (host_file_text(cluster, "h1", output / "metrics.jsonl") or ""):
        assert time.monotonic() < deadline and process.poll() is None, "training never reached step 7"
        time.sleep(0.1)
    for pid in rank_pids(cluster, "h2"):
        os.kill(pid, signal.SIGKILL)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == 0, out[-3000:]
    assert "restart 1/1" in out and "first failure on h2" in out and "resuming from" in out
    seen_by_head = {path.name for path in private.glob("out/*")}
    assert not seen_by_head & {"checkpoints", "metrics.jsonl", "final"}, "storage was shared after all"
    for name in ("h1", "h2"):
        assert host_file_text(cluster, name, output / "checkpoints" / f"step-{LONG_RUN}" / "COMPLETE") is not None, name
    metrics = host_file_text(cluster, "h1", output / "metrics.jsonl")
    final = [json.loads(line) for line in metrics.splitlines() if '"kind": "train"' in line][-1]
    assert final["step"] == LONG_RUN and abs(final["loss"] - reference_losses[LONG_RUN]) <= LOSS_TOLERANCE
