"""Training refuses hosts whose model dir or data differ from the head's (no shared storage)."""

from __future__ import annotations

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.data_checks import identity_problems
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.remote_probe_manifest import path_summary
from deepfleet.plan.recipe import Recipe
from deepfleet.prepare import SYNC_FIX, check_same_inputs, recipe_paths


def test_recipe_paths_are_the_local_model_dir_and_data_files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = Recipe.model_validate({"model": {"name": "model"}, "data": {"train": ["train.jsonl", "absent.jsonl"],
                                                                         "validation": {"files": ["train.jsonl"]}}})
    assert recipe_paths(recipe, str(tmp_path)) == (str(tmp_path / "model"), str(tmp_path / "train.jsonl"))
    hub = Recipe.model_validate({"model": {"name": "meta-llama/Llama-3.2-1B"}, "data": {"train": "builtin:tasks"}})
    assert recipe_paths(hub, str(tmp_path)) == ()


def test_a_host_with_other_data_is_named_with_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("a\n")
    (data / "b.jsonl").write_text("b\n")
    head = {str(data): path_summary(str(data))}
    (data / "b.jsonl").write_text("changed\n")
    other = path_summary(str(data))
    held = {"h1": dict(head), "h2": {str(data): other}, "h3": {}}
    problems = identity_problems(head, held, SYNC_FIX)
    assert [p.render() for p in problems] == [
        f"h2:{data}: differs from the head's copy: 1 differ: b.jsonl "
        f"(fix: run `deepfleet sync {data}` with this fleet, or `deepfleet train --sync`)",
        f"h3:{data}: differs from the head's copy: missing "
        f"(fix: run `deepfleet sync {data}` with this fleet, or `deepfleet train --sync`)"]


def test_the_head_itself_is_not_compared_and_same_data_passes(tmp_path):
    (tmp_path / "t.jsonl").write_text("x\n")
    head = {str(tmp_path / "t.jsonl"): path_summary(str(tmp_path / "t.jsonl"))}
    fleet = Fleet(hosts=(Host(name="me", address="127.0.0.1", local=True), Host(name="h2", address="10.0.0.2")),
                  source="test")
    check_same_inputs(fleet, head, {"me": {}, "h2": dict(head)})
    with pytest.raises(DeepfleetError, match="h2:.*missing"):
        check_same_inputs(fleet, head, {"me": dict(head), "h2": {}})
