"""`deepfleet train` as one supervised job: this machine alone is a fleet of one host (no ssh, a
free rendezvous port), and how a job's outcome becomes the command's ending."""

from __future__ import annotations

import pytest

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.sources import local_host
from deepfleet.launch.job import plan_launch
from deepfleet.launch.supervisor import Failure, JobOutcome
from deepfleet.launch.training import (TrainingJob, cpu_threads_per_rank, default_nproc, outcome_error,
                                       training_fleet)
from deepfleet.fleet.ssh import options_for

RECIPE_JSON = '{"output_dir": "/runs/demo"}'


def local_job(**changes) -> TrainingJob:
    fleet = training_fleet(Fleet(hosts=(local_host(),), source="local machine"), nproc=changes.pop("nproc", None),
                           gpus=changes.pop("gpus", 0))
    values = dict(fleet=fleet, recipe_json=RECIPE_JSON, recipe_env={"HF_TOKEN": "hf_abc123", "NOTE": "two words"},
                  output_dir="/runs/demo", cpu_threads=1)
    return TrainingJob(**{**values, **changes})


def test_this_machine_alone_runs_without_ssh_on_a_free_loopback_port():
    job = local_job()
    plan = plan_launch(job.fleet, job.settings, job_id="df-1", cwd="/w", parent_env={}, extra_env=job.env,
                       interface=None, ssh_options=options_for(job.fleet))
    argv = plan.hosts[0].argv
    assert "ssh" not in argv[0] and argv[1:3] == ["-m", "deepfleet.launch.host_agent"]
    for part in ("--master-addr=127.0.0.1", "--master-port=0", "--nproc=2", "--nnodes=1"):
        assert part in argv
    assert argv[-3:] == [job.fleet.python, "-m", "deepfleet.train"]
    env = plan.hosts[0].env
    assert env["DEEPFLEET_RECIPE"] == RECIPE_JSON and env["OMP_NUM_THREADS"] == "1" and env["NOTE"] == "two words"
    shown = plan.render()
    assert "hf_abc123" not in shown and "HF_TOKEN=****" in shown and f"<the resolved recipe: {len(RECIPE_JSON)} bytes of JSON>" in shown


def test_rank_counts_for_this_machine_and_fleets():
    assert local_job().fleet.hosts[0].slots == 2 and local_job(gpus=8).fleet.hosts[0].slots == 8
    assert local_job(nproc=3).fleet.hosts[0].slots == 3
    fleet = Fleet(hosts=(Host(name="a", address="a", slots=4), Host(name="b", address="b", slots=4)), source="f")
    assert training_fleet(fleet, nproc=None, gpus=0) is fleet   # a fleet keeps its slots and port
    assert (default_nproc(gpus=0), default_nproc(gpus=4)) == (2, 4)
    assert cpu_threads_per_rank(cpu_count=2, nproc=2) == 1 and cpu_threads_per_rank(cpu_count=1, nproc=4) == 1


def outcome(**fields) -> JobOutcome:
    return JobOutcome(**{"exit_code": 0, "failure": None, "teardown_seconds": None, "host_exit_codes": {}, **fields})


def test_outcomes_end_the_command_like_local_runs_did():
    assert outcome_error(outcome(), log_dir="/l") is None
    bad = outcome_error(outcome(exit_code=2, bad_input=["error: data.train:3: not JSON (fix: fix it)"]), log_dir="/l")
    assert bad.exit_code == 2 and bad.render() == "error: data.train:3: not JSON (fix: fix it)"
    stopped = outcome_error(outcome(exit_code=EXIT_PREEMPTED, preempted=True,
                                    preempted_line="[0]:preempted: stopped at step 7; checkpoint /r/step-7"),
                            log_dir="/l")
    assert stopped.exit_code == EXIT_PREEMPTED
    assert stopped.render() == ("error: train: stopped by signal after step 7; checkpoint /r/step-7 is complete "
                                "(fix: run the same command again to resume)")
    failed = outcome_error(outcome(exit_code=137, failure=Failure(host="h2", rank="3", why="exited with code 137",
                                                                    last_lines=[])), log_dir="/l")
    assert failed.exit_code == 137 and "exited with code 137" in failed.render() and "/l" in failed.render()


@pytest.mark.parametrize("line, shown", [
    ("[0]:step 3/10  loss 2.1", True),
    ("[0]:[W socket.cpp:1] hostname of the client socket cannot be retrieved. err=-3", False),
    ("[0]:/x/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated.", False),
    ("[0]:  warnings.warn(", False),     # the source lines of hidden warnings
    ("[0]:  return func(*args, **kwargs)", False),
    ("[0]:Writing model shards: 100%|##########| 1/1", False),
    ("[0]:", False),
    ("[0]:  indented output of the program", True),
])
def test_known_harmless_library_output_stays_out_of_the_console(line, shown):
    from deepfleet.contract import RANK_LINE
    from deepfleet.launch.supervisor import HARMLESS_OUTPUT
    assert (not HARMLESS_OUTPUT.search(line[RANK_LINE.match(line).end():])) is shown
