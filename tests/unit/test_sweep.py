"""The pure parts of `deepfleet sweep`: grid parsing and expansion, seeded sampling, trial ids and the
up-front schema check, host groups for --parallel, resume decisions, ranking, each trial's command and
the SLURM job array script (run through bash for its status lines)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import BatchRequest
from deepfleet.sweep.grid import (build_trials, chosen_indices, combination, combination_count, parse_grid,
                                  split_values)
from deepfleet.sweep.results import TrialResult, ranked, trial_result
from deepfleet.sweep.slurm_array import array_script
from deepfleet.sweep.sweep_dir import (DONE, FAILED, INTERRUPTED, SweepLayout, TrialStatus, hold_sweep_lock,
                                       manifest_difference, trial_action)
from deepfleet.sweep.trial_runs import TrialCommand, ending, partition_hosts, trial_train_args


def test_values_split_at_top_level_commas_only():
    assert split_values("1e-4,2e-4") == ["1e-4", "2e-4"]
    assert split_values("[q_proj,v_proj], all-linear,'a,b',{x: 1, y: 2}") == \
        ["[q_proj,v_proj]", "all-linear", "'a,b'", "{x: 1, y: 2}"]


def test_combinations_in_product_order_last_axis_fastest():
    axes = parse_grid(["train.lr=1e-4,2e-4,4e-4", "lora.r=8,16"])
    assert combination_count(axes) == 6
    assert [combination(axes, i) for i in range(6)] == [
        (f"train.lr={lr}", f"lora.r={r}") for lr in ("1e-4", "2e-4", "4e-4") for r in ("8", "16")]


def test_random_draws_distinct_combinations_the_same_for_the_same_seed():
    axes = parse_grid(["train.lr=1,2,3,4,5", "lora.r=1,2,3,4", "train.seed=1,2,3"])
    first = chosen_indices(axes, random_count=10, seed=7)
    assert first == chosen_indices(axes, random_count=10, seed=7)
    assert len(set(first)) == 10 and all(0 <= i < 60 for i in first)
    assert first != chosen_indices(axes, random_count=10, seed=8)
    assert chosen_indices(axes, random_count=None, seed=7) == list(range(60))
    with pytest.raises(DeepfleetError, match="61 trials asked for, the grid has 60"):
        chosen_indices(axes, random_count=61, seed=0)


def test_trial_ids_come_from_the_values_the_recipe_reads():
    one = build_trials(None, [], parse_grid(["train.lr=1e-4,2e-4"]), [0, 1])
    same = build_trials(None, ["train.max_steps=3"], parse_grid(["train.lr=0.0001"]), [0])
    assert one[0].id == same[0].id != one[1].id
    assert one[0].values == {"train.lr": 0.0001} and one[0].overrides == ("train.lr=1e-4",)
    with pytest.raises(DeepfleetError, match="are the same trial"):
        build_trials(None, [], parse_grid(["train.lr=1e-4,0.0001"]), [0, 1])


def test_a_failing_value_that_random_did_not_draw_is_refused_too():
    axes = parse_grid(["train.lr=1e-4,-1"])
    with pytest.raises(DeepfleetError, match="train.lr=-1: train.lr: Input should be greater than 0"):
        build_trials(None, [], axes, [0])


def test_every_failing_value_is_listed_in_one_error():
    axes = parse_grid(["train.lr=-1,1e-4,abc", "lora.r=8,0"])
    with pytest.raises(DeepfleetError) as info:
        build_trials(None, [], axes, range(combination_count(axes)))
    assert len(info.value.problems) == 1
    text = info.value.problems[0].what
    assert text.startswith("3 grid value(s) fail the recipe schema")
    for fragment in ("train.lr=-1: train.lr: Input should be greater than 0", "train.lr=abc: train.lr:",
                     "lora.r=0: lora.r: Input should be greater than 0"):
        assert text.count(fragment) == 1, text


@pytest.mark.parametrize("specs, fragment", [
    ([], "no --grid given"),
    (["train.lr"], "is not KEY=V1,V2"),
    (["train.lr="], "no values for train.lr"),
    (["train.lr=1,,2"], "an empty value"),
    (["train.lr=1", "train.lr=2"], "train.lr is swept by two --grid options"),
    (["train.lrr=1"], 'unknown key train.lrr (did you mean "lr"?)'),
    (["trian.lr=1"], 'unknown key trian (did you mean "train"?)'),
    (["output_dir=a,b"], "output_dir is set by the sweep"),
])
def test_bad_grids_are_refused(specs, fragment):
    with pytest.raises(DeepfleetError) as info:
        parse_grid(specs)
    assert fragment in info.value.render()


@pytest.mark.parametrize("hosts, groups, expected", [
    (["a", "b"], 2, [("a",), ("b",)]),
    (["a", "b", "c", "d", "e"], 2, [("a", "b", "c"), ("d", "e")]),
    (["a", "b", "c", "d"], 3, [("a", "b"), ("c",), ("d",)]),
    (["a", "b", "c"], 1, [("a", "b", "c")]),
])
def test_hosts_partition_into_disjoint_groups(hosts, groups, expected):
    result = partition_hosts(hosts, groups)
    assert result == expected
    assert sorted(h for group in result for h in group) == sorted(hosts)


def test_more_groups_than_hosts_is_an_error():
    with pytest.raises(ValueError):
        partition_hosts(["a"], 2)


def test_trial_command_puts_trial_overrides_after_the_base_and_the_sweep_settings_last(tmp_path):
    trial = build_trials(None, [], parse_grid(["train.lr=1e-4"]), [0])[0]
    command = TrialCommand(recipe_path="/r.yaml", base_overrides=("train.max_steps=5",),
                           fleet_args=("--fleet", "/f.yaml"), nproc=2, run_name="demo", tags=("mine",))
    args = trial_train_args(command, trial, output_dir=tmp_path / trial.id, hosts=("h1", "h2"))
    assert args[:3] == ["/r.yaml", "train.max_steps=5", "train.lr=1e-4"]
    assert f'output_dir="{tmp_path / trial.id}"' in args
    assert f'logging.run_name="demo-{trial.id}"' in args
    assert f'logging.tags=["mine", "sweep", "{trial.id}"]' in args
    assert args[args.index("--include") + 1] == "h1@h2" and "--fleet" in args and "--nproc=2" in args
    assert "--include" not in trial_train_args(command, trial, output_dir=tmp_path, hosts=None)


@pytest.mark.parametrize("code, stop, status", [
    (0, False, DONE), (75, False, INTERRUPTED), (75, True, INTERRUPTED), (-15, True, INTERRUPTED),
    (143, True, INTERRUPTED), (2, False, FAILED), (1, True, FAILED), (-9, False, FAILED),
])
def test_a_trials_exit_code_is_its_status(code, stop, status):
    assert ending(code, stop_requested=stop, started=0.0, seconds=1.0, error="").status == status


@pytest.mark.parametrize("status, final, retry, action", [
    (None, False, False, "run"),
    (TrialStatus(status=DONE, exit_code=0), True, False, "skip"),
    (TrialStatus(status=DONE, exit_code=0), False, False, "run"),      # its final model is gone
    (TrialStatus(status=INTERRUPTED, exit_code=75), False, False, "run"),
    (TrialStatus(status=FAILED, exit_code=2), False, False, "skip"),
    (TrialStatus(status=FAILED, exit_code=2), False, True, "run"),
])
def test_what_a_resumed_sweep_does_with_each_trial(status, final, retry, action):
    assert trial_action(status, final_exists=final, retry_failed=retry) == action


def test_another_sweep_in_the_dir_is_named_by_its_first_difference():
    base = {"recipe": {"train": {"lr": 1.0, "max_steps": 4}}, "trials": [{"id": "t1", "overrides": ["a=1"]}]}
    assert manifest_difference(base, base) is None
    other_recipe = {**base, "recipe": {"train": {"lr": 1.0, "max_steps": 5}}}
    assert manifest_difference(base, other_recipe) == "its recipe has train.max_steps=4, this command's 5"
    other_grid = {**base, "trials": [{"id": "t2", "overrides": ["a=2"]}]}
    assert manifest_difference(base, other_grid) == "another grid: trial a=2 is not in it"


def test_results_rank_by_validation_loss_and_put_trials_without_one_last():
    trials = build_trials(None, [], parse_grid(["train.lr=1,2,3,4"]), range(4))
    records = [{"kind": "train", "step": s, "tokens_per_second": tps} for s, tps in ((1, 10.0), (2, 30.0), (3, 20.0))]
    done = TrialStatus(status=DONE, exit_code=0, seconds=5.0)
    results = [trial_result(trials[0], done, [*records, {"kind": "validation", "step": 3, "val_loss": 2.5}]),
               trial_result(trials[1], TrialStatus(status=FAILED, exit_code=2, error="bad data"), []),
               trial_result(trials[2], done, records),
               trial_result(trials[3], done, [*records, {"kind": "validation", "step": 1, "val_loss": 9.0},
                                              {"kind": "validation", "step": 3, "val_loss": 1.5}])]
    assert results[0].tokens_per_second == 20.0 and results[0].steps == 3 and results[3].val_loss == 1.5
    order = ranked(results)
    assert [r.id for r in order] == [trials[3].id, trials[0].id, trials[2].id, trials[1].id]
    assert "no validation loss" in order[2].note and order[3].note == "bad data"
    assert isinstance(order[0], TrialResult)


def test_job_array_script_runs_each_task_and_records_its_ending(tmp_path):
    tasks = [(tmp_path / f"status/t{i}.json", ["sh", "-c", f"exit {code}"]) for i, code in enumerate((0, 75, 3))]
    text = array_script(BatchRequest(nodes=2, time="02:00:00"), job_name="deepfleet-sweep-x", workdir=str(tmp_path),
                        log_pattern=str(tmp_path / "job-%A_%a.log"), tasks=tasks, parallel=2)
    assert "#SBATCH --array=0-2%2" in text and "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --time=02:00:00" in text
    script = tmp_path / "sweep.sbatch"
    script.write_text(text)
    for index, expected in enumerate((DONE, INTERRUPTED, FAILED)):
        done = subprocess.run(["bash", str(script)], env={"SLURM_ARRAY_TASK_ID": str(index), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == (0, 75, 3)[index], done.stderr
        recorded = json.loads(Path(tasks[index][0]).read_text())
        assert recorded["status"] == expected and recorded["exit_code"] == (0, 75, 3)[index], recorded
        assert abs(recorded["started"] - time.time()) < 30 and 0 <= recorded["seconds"] < 30
    done = subprocess.run(["bash", str(script)], env={"SLURM_ARRAY_TASK_ID": "7", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "no trial for array task 7" in done.stderr
    assert "%" not in array_script(BatchRequest(), job_name="j", workdir="/", log_pattern="l", tasks=tasks[:2],
                                   parallel=2).split("--array=")[1].splitlines()[0]


def test_the_sweep_lock_is_held_while_a_trial_that_inherited_it_runs(tmp_path):
    layout = SweepLayout(tmp_path)
    lock = hold_sweep_lock(layout)
    with pytest.raises(DeepfleetError, match="another deepfleet sweep, or a trial it started, is still running"):
        hold_sweep_lock(layout)
    trial = subprocess.Popen(["sleep", "30"], pass_fds=(lock,))
    os.close(lock)                      # the sweep is gone; its trial still runs
    try:
        with pytest.raises(DeepfleetError):
            hold_sweep_lock(layout)
    finally:
        trial.kill()
        trial.wait()
    os.close(hold_sweep_lock(layout))
