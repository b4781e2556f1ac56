"""`train --slurm`'s pure parts: time limits, the request checks, the script, sbatch's errors, job state."""

from __future__ import annotations

import subprocess

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import BatchRequest, time_limit_seconds
from deepfleet.launch.slurm_submit import (gpus_in_gres, job_exit_code, job_fields, request_problems, sbatch_script,
                                           submission_error)


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-0", 86400),
                                          ("2-03", 183600), ("1-02:30", 95400), ("1-00:00:10", 86410)])
def test_slurm_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_a_bad_time_is_one_line():
    with pytest.raises(DeepfleetError, match=r"--time 4h: not a time limit"):
        time_limit_seconds("4h")


def test_a_time_limit_too_short_for_a_checkpoint_and_too_many_gpus_are_refused():
    problems = request_problems(BatchRequest(time="5", gpus_per_node=8, partition="a100"), partition_gpus=4)
    assert [p.render() for p in problems] == [
        "--time 5: 300 s leaves under 300 s to start training before the checkpoint signal 120 s before the "
        "end, so no checkpoint would be written (fix: --time 7 (minutes) or more)",
        "--gpus-per-node 8: partition a100 has 4 GPU(s) per node (fix: --gpus-per-node 4 or less, or another "
        "--partition)"]
    assert request_problems(BatchRequest(time="10", gpus_per_node=4), partition_gpus=4) == []


@pytest.mark.parametrize("gres,gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4),
                                       ("nvme:1,gpu:h100:8(S:0-1)", 8)])
def test_gpus_in_sinfo_gres(gres, gpus):
    assert gpus_in_gres(gres) == gpus


def test_the_script_asks_for_sigterm_before_the_limit_is_requeueable_and_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    script = sbatch_script(BatchRequest(nodes=2, gpus_per_node=8, partition="gpu", time="04:00:00"),
                           job_name="deepfleet-run", workdir="/work dir", log_pattern="/out/slurm/job-%j.log",
                           train_argv=["/venv/bin/python", "-m", "deepfleet.cli.app", "train", "/r.yaml", "a=b c"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --signal=B:TERM@120",
                 "#SBATCH --requeue", "#SBATCH '--chdir=/work dir'",
                 "/venv/bin/python -m deepfleet.cli.app train /r.yaml 'a=b c' &"):
        assert line in script.splitlines(), line
    assert "hf_secret_value" not in script and "account" not in script
    assert not any("requeue" in line for line in script.splitlines() if not line.startswith("#")), \
        "the script must not requeue itself: a cancel's SIGTERM looks like a time limit's"
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_the_script_hands_sigterm_to_the_training_and_exits_with_its_code(tmp_path):
    """Run the script's body with a stand-in for the training that exits 75 on SIGTERM."""
    stand_in = tmp_path / "train.sh"
    stand_in.write_text("trap 'exit 75' TERM; touch started; while true; do sleep 0.1; done\n")
    script = sbatch_script(BatchRequest(), job_name="x", workdir=str(tmp_path), log_pattern="x",
                           train_argv=["bash", str(stand_in)])
    process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                               env={"SLURM_JOB_ID": "42", "PATH": "/usr/bin:/bin"})
    for _ in range(100):
        if (tmp_path / "started").exists():
            break
        subprocess.run(["sleep", "0.05"])
    process.send_signal(15)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 75 and out == ""


def test_sbatch_refusals_are_one_line():
    stderr = ("sbatch: error: invalid partition specified: nope\n"
              "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    error = submission_error(stderr, BatchRequest(partition="nope"))
    assert error.render() == ("error: --partition nope: Batch job submission failed: Invalid partition name specified "
                              "(fix: see `sinfo -s` for the partitions)")


def test_job_state_and_exit_codes():
    fields = job_fields("JobId=7 JobName=deepfleet-run UserId=root(0) JobState=COMPLETED Reason=None "
                        "Requeue=1 Restarts=1 ExitCode=0:0 StdOut=/out/slurm/job-7.log")
    assert fields["JobState"] == "COMPLETED" and fields["StdOut"] == "/out/slurm/job-7.log"
    assert job_exit_code(fields) == 0
    assert job_exit_code({"JobState": "FAILED", "ExitCode": "2:0"}) == 2
    assert job_exit_code({"JobState": "CANCELLED", "ExitCode": "0:15"}) == 143
    assert job_exit_code({"JobState": "TIMEOUT", "ExitCode": "0:0"}) == 1
