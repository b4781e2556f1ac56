"""Which checkpoints count, when saves are due, and what a resume may not change (no ranks needed)."""

import json
import shutil

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.checkpoint_layout import (COMPLETE_MARKER, SavePolicy, check_resumable, complete_checkpoints,
                                        remove_incomplete, run_fingerprint, step_dir)


def make_checkpoint(output_dir, step, *, complete, fingerprint=None):
    path = step_dir(output_dir, step)
    (path / "engine").mkdir(parents=True)
    (path / "engine" / "shard.pt").write_bytes(b"x")
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": step, "fingerprint": fingerprint or {}}))
    return path


def test_only_marked_checkpoints_count_and_unmarked_ones_are_removed(tmp_path):
    make_checkpoint(tmp_path, 2, complete=True)
    make_checkpoint(tmp_path, 10, complete=True)
    half = make_checkpoint(tmp_path, 12, complete=False)   # a save that died: largest step, no marker
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 10]
    assert remove_incomplete(tmp_path) == [half]
    assert not half.exists() and step_dir(tmp_path, 10).exists()
    assert complete_checkpoints(tmp_path / "nothing-here") == []


def test_save_policy_by_steps_and_by_time():
    policy = SavePolicy(every_steps=5, every_minutes=0, keep=2)
    assert [s for s in range(1, 16) if policy.due(step=s, seconds_since_save=0)] == [5, 10, 15]
    timed = SavePolicy(every_steps=0, every_minutes=0.5, keep=2)
    assert not timed.due(step=1, seconds_since_save=29.9) and timed.due(step=2, seconds_since_save=30)
    assert not SavePolicy(every_steps=0, every_minutes=0, keep=1).due(step=100, seconds_since_save=1e9)


def test_resume_that_would_change_the_run_names_each_difference(tmp_path):
    recipe = parse_recipe("train: {global_batch: 16}\n")
    path = make_checkpoint(tmp_path, 4, complete=True, fingerprint=run_fingerprint(recipe, world_size=2))
    check_resumable(path, run_fingerprint(recipe, world_size=2))  # same run: fine
    other = parse_recipe("method: lora\ntrain: {global_batch: 32}\n")
    with pytest.raises(DeepfleetError) as info:
        check_resumable(path, run_fingerprint(other, world_size=4))
    text = info.value.render()
    assert "method: checkpoint has 'full', this run has 'lora'" in text
    assert "world_size: checkpoint has 2, this run has 4" in text
    assert "global_batch: checkpoint has 16, this run has 32" in text
    assert "--no-resume" in text and text.count("\n") == 0


def test_output_dir_must_be_creatable_and_have_room_for_a_checkpoint(tmp_path):
    from deepfleet.train.preflight import checkpoint_bytes, output_dir_problems

    assert output_dir_problems(tmp_path / "new" / "run", needed_bytes=1000) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    [problem] = output_dir_problems(blocker / "run", needed_bytes=None)
    assert "cannot be created" in problem.what and problem.where == "output_dir"
    [problem] = output_dir_problems(tmp_path / "run", needed_bytes=2**60)
    assert "one checkpoint needs about" in problem.what and "GiB free" in problem.what
    assert checkpoint_bytes(total_params=10, trainable_params=2, precision_bytes=2) == 10 * 2 + 2 * 12


def test_resume_from_a_marked_checkpoint_without_engine_dir_names_the_dir_before_deepspeed(tmp_path):
    from deepfleet.train.checkpoint import load_checkpoint

    class DeepSpeedEngine:  # what DeepSpeed does with a missing tag dir: an assertion without a message
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError

    path = make_checkpoint(tmp_path, 6, complete=True)
    shutil.rmtree(path / "engine")
    with pytest.raises(DeepfleetError) as info:
        load_checkpoint(DeepSpeedEngine(), path, rank=0)
    text = info.value.render()
    assert "checkpoint is damaged: it has no engine/ dir" in text and text.count("\n") == 0
    assert info.value.problems[0].where == str(path) and "delete this step dir" in info.value.problems[0].fix


@pytest.mark.parametrize("steps_by_rank, expected", [
    ([("a", [100, 200]), ("a", [100, 200]), ("b", [100, 200])], 200),
    ([("a", [100, 200]), ("b", [100])], 100),          # b stopped before marking 200: both still have 100
    ([("a", []), ("b", [])], -1),                      # a fresh run
])
def test_resume_step_is_the_newest_every_rank_has(tmp_path, steps_by_rank, expected):
    from deepfleet.train.checkpoint import common_resume_step
    assert common_resume_step(steps_by_rank, tmp_path) == expected


def test_a_host_without_the_others_checkpoints_is_an_error_not_a_silent_restart(tmp_path):
    from deepfleet.train.checkpoint import common_resume_step
    with pytest.raises(DeepfleetError) as info:
        common_resume_step([("gpu1", [100, 200]), ("gpu2", [])], tmp_path)
    assert "newest per host: gpu1: 200; gpu2: none" in str(info.value) and "resume: false" in str(info.value)
