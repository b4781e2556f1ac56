"""`deepfleet train --timings` on this machine: every startup phase measured, none negative, and
together no longer than the command really took to its first step."""

import json
import os
import subprocess
import time

import pytest

from training_fixtures import DEEPFLEET, write_recipe, write_task_data

pytestmark = pytest.mark.integration

# Wall time read by this test includes reading the summary line from a pipe; the phases' own rounding.
TOLERANCE_SECONDS = 0.25
# The agent's process start is known to one kernel tick, and may fall in the tick before the head's
# spawn of it; each of the 13 phases is rounded to the millisecond.
OVERLAP_SECONDS = 1 / os.sysconf("SC_CLK_TCK") + 13 * 0.0005


def test_timings_cover_the_whole_startup_and_add_up_to_no_more_than_the_wall_time(tmp_path):
    train, _ = write_task_data(tmp_path / "data", n_train=200, n_validation=4)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), data={"train": [str(train)]},
                          train={"max_steps": 3, "global_batch": 4, "micro_batch": 2},
                          logging={"tensorboard": False})
    started = time.monotonic()
    job = subprocess.Popen([DEEPFLEET, "train", str(recipe), "--nproc", "2", "--timings"], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        for line in job.stdout:
            seen.append(line)
            if line.startswith("startup "):
                wall = time.monotonic() - started
                break
        else:
            raise AssertionError("no startup line:\n" + "".join(seen[-30:]))
        rest = job.stdout.read()
        assert job.wait(timeout=300) == 0, "".join(seen) + rest
    finally:
        job.kill()
    output = "".join(seen) + rest
    assert "[0]:startup: " not in output                       # the rank's report stays in the host log
    assert "startup phases on " in rest and "total to the first step" in rest    # --timings' table

    timings = json.loads((tmp_path / "out" / "logs" / "attempt-0" / "startup.json").read_text())
    phases = ["cli_import", "planning", "head_data", "launch_prep", "agent_start", "rank_spawn", "rank_imports",
              "rendezvous", "rank_data", "model_build", "deepspeed_init", "run_setup", "first_step"]
    assert timings["connect"] is None                          # this machine: no ssh
    missing = [name for name in phases if timings[name] is None]
    negative = {name: timings[name] for name in phases if timings[name] is not None and timings[name] < 0}
    assert not missing and not negative, timings
    measured = sum(timings[name] for name in phases)
    assert measured <= timings["total"] + OVERLAP_SECONDS, timings
    assert timings["total"] <= wall + TOLERANCE_SECONDS, (timings["total"], wall)
    assert timings["other"] >= -OVERLAP_SECONDS and timings["rank_imports"] > 0.5, timings   # torch alone takes longer
