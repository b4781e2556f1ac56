"""`train --pbs`: the qsub script as text, its body run with a stand-in training, and qsub's absence."""

from __future__ import annotations

import subprocess
import time

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import BatchRequest
from deepfleet.launch.pbs_submit import qsub_script, select_statement, train_on_pbs, walltime


@pytest.mark.parametrize("text,pbs", [("30", "00:30:00"), ("04:00:00", "04:00:00"), ("2-03", "51:00:00"),
                                      ("1-00:00:10", "24:00:10"), ("90:30", "01:30:30")])
def test_walltime_is_hh_mm_ss(text, pbs):
    assert walltime(text) == pbs


@pytest.mark.parametrize("nodes,gpus,select", [(2, 8, "select=2:ngpus=8:mpiprocs=8"), (3, 0, "select=3:mpiprocs=1")])
def test_one_chunk_per_node_and_one_nodefile_line_per_gpu(nodes, gpus, select):
    assert select_statement(BatchRequest(nodes=nodes, gpus_per_node=gpus)) == select


def test_the_script_asks_for_whole_nodes_is_rerunnable_and_holds_no_secret(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    script = qsub_script(BatchRequest(nodes=2, gpus_per_node=4, partition="gpuq", time="2-00:00:00", account="proj"),
                         job_name="deepfleet-run", workdir="/work dir", log_dir="/out/pbs",
                         train_argv=["/venv/bin/python", "-m", "deepfleet.cli.app", "train", "/r.yaml", "a=b c"])
    lines = script.splitlines()
    for line in ("#PBS -N deepfleet-run", "#PBS -l select=2:ngpus=4:mpiprocs=4", "#PBS -l place=scatter:excl",
                 "#PBS -l walltime=48:00:00", "#PBS -q gpuq", "#PBS -A proj", "#PBS -r y", "cd '/work dir'",
                 "/venv/bin/python -m deepfleet.cli.app train /r.yaml 'a=b c' &"):
        assert line in lines, line
    # The script's own SIGTERM comes grace_seconds (120) before the walltime.
    assert any(f"sleep {48 * 3600 - 120} & sleeper=$!" in line for line in lines)
    assert "hf_secret_value" not in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_the_script_stops_the_training_before_the_walltime_and_exits_with_its_code(tmp_path):
    """Its body, with a 0 s grace on a 1-minute walltime shortened to 1 s: the stand-in gets SIGTERM and exits 75."""
    stand_in = tmp_path / "train.sh"
    stand_in.write_text("trap 'echo got-term; exit 75' TERM; while true; do sleep 0.1; done\n")
    script = qsub_script(BatchRequest(time="1", grace_seconds=59), job_name="x", workdir=str(tmp_path),
                         log_dir=str(tmp_path), train_argv=["bash", str(stand_in)])
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", script], env={"PBS_JOBID": "7.server", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 75 and time.monotonic() - started < 20
    assert (tmp_path / "job-7.log").read_text() == "got-term\n"


def test_a_training_that_ends_first_leaves_no_timer_behind(tmp_path):
    script = qsub_script(BatchRequest(time="1-00:00:00", grace_seconds=113), job_name="x", workdir=str(tmp_path),
                         log_dir=str(tmp_path), train_argv=["sleep", "0.3"])
    done = subprocess.run(["bash", "-c", script], env={"PBS_JOBID": "8", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 0
    time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", f"^sleep {86400 - 113}$"]).returncode == 1, "the timer outlived the job"


def test_pbs_without_qsub_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeepfleetError) as raised:
        train_on_pbs(BatchRequest(), train_args=["r.yaml"], output_dir=tmp_path / "out")
    assert raised.value.render() == ("error: --pbs: qsub not found on PATH (fix: run on a PBS login node "
                                     "(or `module load pbs`), or train with --fleet)")
    assert not (tmp_path / "out").exists()


def test_a_refused_submission_leaves_nothing_behind(tmp_path, monkeypatch):
    qsub = tmp_path / "bin" / "qsub"
    qsub.parent.mkdir()
    qsub.write_text("#!/bin/sh\necho 'qsub: Unknown queue' >&2\nexit 1\n")
    qsub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{qsub.parent}:/usr/bin:/bin")
    with pytest.raises(DeepfleetError, match=r"^error: --partition nope: Unknown queue \(fix: see `qstat -Q`"):
        train_on_pbs(BatchRequest(partition="nope"), train_args=["r.yaml"], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
