"""`deepfleet sweep --parallel 2` on two namespace hosts: the fleet split in two groups, one trial on
each at the same time, each through `deepfleet train` on its own host."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from namespace_cluster import fleet_yaml_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from training_fixtures import DEEPFLEET, write_recipe, write_task_data  # noqa: E402

pytestmark = pytest.mark.cluster


def python_for_hosts(tmp: Path) -> str:
    """The hosts' python: this one, or, when this test runs a source tree through PYTHONPATH (a worktree),
    a wrapper that gives the host agent the same tree (ssh forwards no environment to it)."""
    if not os.environ.get("PYTHONPATH"):
        return sys.executable
    wrapper = tmp / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={os.environ['PYTHONPATH']} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def test_parallel_sweep_runs_one_trial_per_host_at_once(namespace_cluster, tmp_path):
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, ["h1", "h2"],
                                                         extra=f"python: {python_for_hosts(tmp_path)}\n"))
    train, validation = write_task_data(tmp_path / "data", n_train=400, n_validation=16)
    recipe = write_recipe(
        tmp_path / "r.yaml", model="builtin:tiny", method="full",
        data={"train": [str(train)], "max_length": 64, "validation": {"files": [str(validation)]}},
        train={"max_steps": 6, "global_batch": 8, "micro_batch": 4, "lr": 2e-3, "warmup": 1, "seed": 3},
        deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
        output_dir=str(tmp_path / "out"))
    done = subprocess.run([DEEPFLEET, "sweep", str(recipe), "--grid", "train.lr=1e-3,3e-3", "--parallel", "2",
                           "--fleet", "fleet.yaml"], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    sweep = tmp_path / "out" / "sweep"
    trials = [t["id"] for t in json.loads((sweep / "sweep.json").read_text())["trials"]]
    hosts = {t: sorted(p.stem for p in (sweep / "trials" / t / "logs" / "attempt-0").glob("*.log")) for t in trials}
    assert sorted(hosts.values()) == [["h1"], ["h2"]], hosts
    statuses = [json.loads((sweep / "status" / f"{t}.json").read_text()) for t in trials]
    assert max(s["started"] for s in statuses) < min(s["started"] + s["seconds"] for s in statuses), statuses
    results = json.loads((sweep / "results.json").read_text())
    assert [r["status"] for r in results] == ["done", "done"] and all(r["val_loss"] for r in results), results


def test_slurm_sweep_is_one_job_array_with_a_task_per_trial(slurm_cluster):
    """`--slurm --parallel 2`: one array of 2 tasks (no throttle needed), each a `deepfleet train` on the
    node SLURM picks (two tasks may share one: each job has its own rendezvous port), each trial's status
    written by its task, ranked once the array is over."""
    workdir = slurm_cluster.root / "tmp" / "sweep"
    workdir.mkdir(parents=True)
    train, validation = write_task_data(workdir / "data", n_train=160, n_validation=8)
    recipe = write_recipe(
        workdir / "r.yaml", model="builtin:tiny", method="full",
        data={"train": [str(train)], "max_length": 64, "validation": {"files": [str(validation)]}},
        train={"max_steps": 4, "global_batch": 4, "micro_batch": 2, "warmup": 1, "seed": 3},
        deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
        output_dir=str(workdir / "out"))
    done = subprocess.run([DEEPFLEET, "sweep", str(recipe), "--grid", "train.lr=1e-3,3e-3", "--slurm", "--parallel", "2"],
                          cwd=workdir, env=slurm_cluster.env, capture_output=True, text=True, timeout=400)
    sweep = workdir / "out" / "sweep"
    logs = "".join(p.read_text()[-3000:] for p in sorted((sweep / "slurm").glob("job-*.log")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:] + logs
    assert "#SBATCH --array=0-1\n" in (sweep / "slurm" / "sweep.sbatch").read_text()
    job = int(done.stdout.split("submitted job array ")[1].split()[0])
    assert sorted(p.name for p in (sweep / "slurm").glob("job-*.log")) == [f"job-{job}_0.log", f"job-{job}_1.log"]
    results = json.loads((sweep / "results.json").read_text())
    assert [r["status"] for r in results] == ["done", "done"] and all(r["val_loss"] for r in results), results
    nodes = {r["id"]: sorted(p.stem for p in (sweep / "trials" / r["id"] / "logs" / "attempt-0").glob("*.log"))
             for r in results}
    assert all(len(ran) == 1 and ran[0] in slurm_cluster.node_names for ran in nodes.values()), nodes
