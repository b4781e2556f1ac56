"""`deepfleet export` refuses --to targets it would destroy and reports damaged checkpoints as one line.

The checkpoints are ZeRO-0 ones written by hand (what DeepSpeed writes for rank 0), so no ranks run."""

import json
import shutil
import sys

import pytest
import torch

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.checkpoint_layout import COMPLETE_MARKER, DS_CONFIG_FILE, ENGINE_TAG, RECIPE_FILE, step_dir
from deepfleet.train.export import export_checkpoint
from deepfleet.train.model import build_model
from deepfleet.train.save import RUN_INFO_FILE
from deepfleet.train.tokenizer import load_tokenizer

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def tiny_state():
    recipe = parse_recipe("method: full\n")
    model = build_model(recipe, load_tokenizer(recipe.model), ds_config={}, precision="fp32",
                        device=torch.device("cpu")).model
    return recipe, model.state_dict()


@pytest.fixture
def run_dir(tmp_path, tiny_state):
    """A run dir with one complete ZeRO-0 checkpoint at step 4."""
    recipe, state = tiny_state
    checkpoint = step_dir(tmp_path / "run", 4)
    (checkpoint / ENGINE_TAG).mkdir(parents=True)
    torch.save({"module": state}, checkpoint / ENGINE_TAG / MODEL_STATES)
    (checkpoint / RECIPE_FILE).write_text(recipe.model_dump_json(exclude={"env"}))
    (checkpoint / DS_CONFIG_FILE).write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 4}))
    return tmp_path / "run"


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def refused(run, to) -> DeepfleetError:
    with pytest.raises(DeepfleetError) as info:
        export_checkpoint(run, to=to)
    assert info.value.render().count("\n") == 0
    return info.value


def test_export_writes_a_model_dir_and_may_replace_a_previous_export(run_dir, tmp_path):
    target = export_checkpoint(run_dir, to=tmp_path / "out")
    assert (target / "model.safetensors").is_file() and (target / RUN_INFO_FILE).is_file()
    (tmp_path / "empty").mkdir()
    assert export_checkpoint(run_dir, to=tmp_path / "empty") == tmp_path / "empty"
    assert export_checkpoint(run_dir, to=tmp_path / "out") == target  # a previous export: replaced
    assert export_checkpoint(run_dir, to=run_dir / "export-4") == run_dir / "export-4"   # beside checkpoints/
    assert not list(tmp_path.glob(".out*")) and not list(tmp_path.glob(".empty*"))


@pytest.mark.parametrize("name,expected", [
    ("run", "is or contains the run dir"),
    (".", "is or contains the run dir"),
    ("run/checkpoints", "inside the run's checkpoints/ dir"),
    ("run/checkpoints/step-4/engine", "inside the run's checkpoints/ dir"),
    ("a-file", "not a directory"),
    ("notes", "not a previous deepfleet export"),
])
def test_export_refuses_a_target_it_would_destroy_and_leaves_it_untouched(run_dir, tmp_path, monkeypatch,
                                                                           name, expected):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = files_under(tmp_path)
    monkeypatch.chdir(tmp_path)
    error = refused(run_dir, tmp_path / name if name != "." else type(tmp_path)("."))
    assert expected in error.render()
    assert error.problems[0].where == str((tmp_path / name).resolve())
    assert "choose a new or empty directory" in error.problems[0].fix
    assert files_under(tmp_path) == before


def test_export_refuses_the_current_dir_and_the_filesystem_root(run_dir, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert "current directory" in refused(run_dir, type(tmp_path)(".")).render()
    assert "filesystem root" in refused(run_dir, type(tmp_path)("/")).render()


def break_ds_config(checkpoint):
    (checkpoint / DS_CONFIG_FILE).write_text('{"zero_optimization": {"stage"')


def remove_engine_dir(checkpoint):
    shutil.rmtree(checkpoint / ENGINE_TAG)


def truncate_model_states(checkpoint):
    path = checkpoint / ENGINE_TAG / MODEL_STATES
    path.write_bytes(path.read_bytes()[:1000])


def empty_model_states(checkpoint):
    (checkpoint / ENGINE_TAG / MODEL_STATES).write_bytes(b"")


@pytest.mark.parametrize("damage,expected", [
    (break_ds_config, "ds_config.json is missing or not a DeepSpeed config"),
    (remove_engine_dir, "it has no engine/ dir"),
    (truncate_model_states, "cannot read the weights in engine/"),
    (empty_model_states, "cannot read the weights in engine/"),
])
def test_damaged_checkpoint_is_one_error_naming_the_checkpoint(run_dir, tmp_path, damage, expected):
    checkpoint = step_dir(run_dir, 4)
    damage(checkpoint)
    error = refused(run_dir, tmp_path / "out")
    assert f"checkpoint is damaged: {expected}" in error.render()
    assert error.problems[0].where == str(checkpoint) and "--step N" in error.problems[0].fix
    assert not list(tmp_path.glob("*out*")) and not list(tmp_path.glob(".out*"))


def test_checkpoint_without_recipe_says_it_is_not_a_deepfleet_run(run_dir, tmp_path):
    (step_dir(run_dir, 4) / RECIPE_FILE).unlink()
    error = refused(run_dir, tmp_path / "out")
    assert "has no recipe.json: this is not a deepfleet run dir, or it is damaged" in error.render()
    assert "built-in demo" not in error.render() and error.problems[0].where == str(step_dir(run_dir, 4))


def test_cli_export_onto_its_own_run_dir_exits_2_with_one_line(run_dir, monkeypatch, capsys):
    from deepfleet.cli.app import main

    before = files_under(run_dir)
    monkeypatch.setattr(sys, "argv", ["deepfleet", "export", str(run_dir), "--to", str(run_dir)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}: --to is or contains the run dir") and err.count("\n") == 1
    assert files_under(run_dir) == before


def test_a_failed_write_leaves_no_staging_dir_behind(tmp_path):
    from deepfleet.train.save import write_model_dir

    class FailingModel:
        def save_pretrained(self, path, **kwargs):
            (path / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_model_dir(FailingModel(), None, tmp_path / "out", state_dict=None, is_lora=False,
                        base_model_name="builtin:tiny", save_base_weights=False)
    assert list(tmp_path.iterdir()) == []
