"""Prepared data: the memory-mapped entry gives exactly what each rank built itself, its key follows
every input that decides the content, and bad caches and bad places fail in one line."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from deepfleet.data_cache import prepare_recipe_data
from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.row_plan import plan_rows
from deepfleet.train.builtin import builtin_task_records
from deepfleet.train.dataset import build_datasets
from deepfleet.train.prepared_data import load_entry, rank_datasets
from deepfleet.train.tokenizer import load_tokenizer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", builtin_task_records(120, seed=7, split="train"))


def recipe_for(data: Path, cache: Path, **data_overrides):
    spec = {"train": [str(data)], "max_length": 48, "validation": {"split": 0.1}, "cache_dir": str(cache),
            **data_overrides}
    return parse_recipe(json.dumps({"model": "builtin:tiny", "data": spec, "train": {"seed": 5}}))


def test_ranks_map_exactly_what_they_would_have_built(data, tmp_path):
    recipe = recipe_for(data, tmp_path / "cache")
    prepared = prepare_recipe_data(recipe, note=print)
    tokenizer = load_tokenizer(recipe.model)
    built_train, built_validation, built_report = build_datasets(recipe.data, tokenizer, seed=5)
    train, validation, report = rank_datasets(recipe, tokenizer, str(prepared.path))
    assert type(train).__name__ == "MappedExamples"
    assert list(train) == built_train and list(validation) == built_validation and report == built_report
    assert train[3:5] == built_train[3:5]
    # Row plans (packing included) come out the same from the lengths alone.
    for packing in (True, False):
        assert (plan_rows(train, max_length=48, packing=packing, seed=5, epoch=1)
                == plan_rows(built_train, max_length=48, packing=packing, seed=5, epoch=1))


def test_the_key_follows_the_content_and_an_old_entry_comes_back(data, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_recipe_data(recipe_for(data, cache))
    again = prepare_recipe_data(recipe_for(data, cache))
    assert first.built and not again.built and again.path == first.path
    assert prepare_recipe_data(recipe_for(data, cache, packing=False)).path == first.path   # rows, not examples

    original = data.read_text()
    write_jsonl(data, builtin_task_records(120, seed=8, split="train"))
    changed = prepare_recipe_data(recipe_for(data, cache))
    assert changed.built and changed.path != first.path
    data.write_text(original)
    assert prepare_recipe_data(recipe_for(data, cache)).path == first.path
    for different in ({"max_length": 40}, {"validation": {"split": 0.2}}, {"format": "messages"}):
        assert prepare_recipe_data(recipe_for(data, cache, **different)).path != first.path, different
    other_seed = parse_recipe(recipe_for(data, cache).model_dump_json().replace('"seed":5', '"seed":6'))
    assert other_seed.train.seed == 6 and prepare_recipe_data(other_seed).path != first.path


def test_a_changed_tokenizer_gives_a_new_entry(data, tmp_path):
    model = tmp_path / "model"
    load_tokenizer(parse_recipe('model: "builtin:tiny"').model).save_pretrained(model)
    recipe = parse_recipe(json.dumps({"model": str(model), "data": {"train": [str(data)], "max_length": 48,
                                                                     "cache_dir": str(tmp_path / "cache")}}))
    first = prepare_recipe_data(recipe)
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    second = prepare_recipe_data(recipe)
    assert second.built and second.path != first.path


def test_a_damaged_entry_is_noted_and_built_again(data, tmp_path):
    recipe = recipe_for(data, tmp_path / "cache")
    first = prepare_recipe_data(recipe)
    ids = first.path / "train.ids.npy"
    size = ids.stat().st_size
    ids.write_bytes(ids.read_bytes()[:-8])
    notes = []
    again = prepare_recipe_data(recipe, note=notes.append)
    assert again.built and again.path == first.path
    assert notes == [f"note: prepared data {first.path} is damaged (train.ids.npy has {size - 8} bytes, not {size}); "
                     "building it again"]
    assert list(load_entry(again.path)[0]) == list(load_entry(first.path)[0])


def test_a_rank_without_the_entry_tokenizes_itself(data, tmp_path, caplog):
    recipe = recipe_for(data, tmp_path / "cache")
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = rank_datasets(recipe, tokenizer, str(tmp_path / "cache" / "absent"))
    assert type(train) is list and len(train) > 0
    assert "is missing on this host; tokenizing here" in caplog.text


def test_an_unwritable_cache_is_one_line_before_any_work(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DeepfleetError) as raised:
        prepare_recipe_data(recipe_for(data, blocker / "cache"))
    assert raised.value.render() == (f"error: {blocker}/cache: cannot write the prepared-data cache: {blocker} is not "
                                     "a directory (fix: make it writable, or set data.cache_dir to a writable dir)")


def test_no_room_names_the_size_and_writes_nothing(data, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(DeepfleetError, match=r"data.cache_dir: the prepared data needs \d+ MiB and .* has 0 MiB free"):
        prepare_recipe_data(recipe_for(data, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_data_file_changing_while_it_is_prepared_is_refused(data, tmp_path, monkeypatch):
    from deepfleet import data_build

    real = data_build.build_chunked

    def build_then_change(*args, **kwargs):
        built = real(*args, **kwargs)
        with data.open("a") as handle:
            handle.write(json.dumps(builtin_task_records(1, seed=9, split="train")[0]) + "\n")
        os.utime(data, ns=(1, 1))
        return built

    monkeypatch.setattr(data_build, "build_chunked", build_then_change)
    with pytest.raises(DeepfleetError, match="a data file changed while it was being prepared"):
        prepare_recipe_data(recipe_for(data, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
