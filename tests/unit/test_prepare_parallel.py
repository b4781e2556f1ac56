"""Prepare in parallel: the entry two workers build over many chunks is the same byte for byte as
one process builds, and a bad record found by a worker is the same one-line error, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepfleet import data_build
from deepfleet.data_cache import prepare_recipe_data
from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.builtin import builtin_task_records
from deepfleet.train.dataset import build_datasets
from deepfleet.train.prepared_data import ChunkPart, load_entry, write_entry
from deepfleet.train.examples import DatasetReport
from deepfleet.train.tokenizer import load_tokenizer

MAX_LENGTH = 64


def conversation(index: int) -> dict:
    """Some cut to max_length, some with no answer left after the cut (dropped), most whole."""
    user = "q" * (90 if index % 7 == 0 else 10 + index % 13)
    answer = "a" * (60 if index % 5 == 0 else 5 + index % 11)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of about 1.5 KiB (a few dozen records) so a small file spreads over many."""
    monkeypatch.setattr(data_build, "MIN_CHUNK_BYTES", 1500)
    monkeypatch.setattr(data_build, "CHUNK_RECORDS", 40)


def recipe_for(train: list[str], cache: Path, **data):
    spec = {"train": train, "max_length": MAX_LENGTH, "cache_dir": str(cache), **data}
    return parse_recipe(json.dumps({"model": "builtin:tiny", "data": spec, "train": {"seed": 3}}))


def entry_files(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


@pytest.mark.parametrize("data", [{"validation": {"split": 0.1}}, {"validation": {"files": ["VALID"]}}],
                         ids=["split", "files"])
def test_two_workers_write_the_entry_one_process_writes(tmp_path, small_chunks, monkeypatch, data):
    chat = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(400)])
    more = tmp_path / "more.json"   # read on the head, handed out a run of records at a time
    more.write_text(json.dumps(builtin_task_records(90, seed=2, split="train")))
    held = write_jsonl(tmp_path / "held.jsonl", [conversation(i) for i in range(1000, 1150)])
    data = json.loads(json.dumps(data).replace("VALID", str(held)))
    pools = []
    real_pool = data_build.ProcessPoolExecutor
    monkeypatch.setattr(data_build, "ProcessPoolExecutor", lambda **kw: pools.append(kw) or real_pool(**kw))

    one = prepare_recipe_data(recipe_for([str(chat), str(more)], tmp_path / "one", **data), workers=1)
    two = prepare_recipe_data(recipe_for([str(chat), str(more)], tmp_path / "two", **data), workers=2)
    assert [pool["max_workers"] for pool in pools] == [2], "two workers and many chunks: one pool, kept"
    assert one.path.name == two.path.name
    assert entry_files(one.path) == entry_files(two.path)
    report = one.report
    assert report.n_truncated > 0 and report.n_without_answer > 0 and report.n_validation > 0
    assert not list((tmp_path / "two").glob(".*")), "no staging or chunk files left"

    # And what a rank that tokenizes for itself builds, example by example.
    recipe = recipe_for([str(chat), str(more)], tmp_path / "two", **data)
    train, validation, built_report = build_datasets(recipe.data, load_tokenizer(recipe.model), seed=3)
    mapped_train, mapped_validation, mapped_report = load_entry(two.path)
    assert list(mapped_train) == train and list(mapped_validation) == validation and mapped_report == built_report


def test_the_entry_arrays_are_what_np_save_writes(tmp_path):
    """Written a chunk at a time, read back as one: the same bytes as saving the whole arrays."""
    rng = np.random.default_rng(0)
    parts, whole = [], {"ids": [], "labels": [], "lengths": []}
    for index in range(3):
        lengths = rng.integers(1, 9, size=5)
        keep = rng.random(5) < 0.6
        for name in ("ids", "labels"):
            np.save(tmp_path / f"{index}.{name}.npy", rng.integers(-100, 500, size=int(lengths.sum()), dtype=np.int32))
        parts.append(ChunkPart(ids=tmp_path / f"{index}.ids.npy", labels=tmp_path / f"{index}.labels.npy",
                               lengths=lengths, keep=keep))
        mask = np.repeat(keep, lengths)
        whole["ids"].append(np.load(tmp_path / f"{index}.ids.npy")[mask])
        whole["labels"].append(np.load(tmp_path / f"{index}.labels.npy")[mask])
        whole["lengths"].append(lengths[keep])
    entry = tmp_path / "entry"
    entry.mkdir()
    report = DatasetReport(n_train=0, n_validation=0, n_truncated=0, n_tokens=0, format="text")
    write_entry(entry, {"train": parts, "validation": []}, report, {})
    saved = tmp_path / "saved"
    saved.mkdir()
    np.save(saved / "ids.npy", np.concatenate(whole["ids"]))
    np.save(saved / "labels.npy", np.concatenate(whole["labels"]))
    np.save(saved / "offsets.npy", np.concatenate(([0], np.cumsum(np.concatenate(whole["lengths"])))))
    np.save(saved / "empty.npy", np.zeros(0, dtype=np.int32))
    for name in ("ids", "labels", "offsets"):
        assert (entry / f"train.{name}.npy").read_bytes() == (saved / f"{name}.npy").read_bytes(), name
    assert (entry / "validation.ids.npy").read_bytes() == (saved / "empty.npy").read_bytes()


def refusal(recipe, workers: int) -> str:
    with pytest.raises(DeepfleetError) as raised:
        prepare_recipe_data(recipe, workers=workers)
    return raised.value.render()


@pytest.mark.parametrize("damage", ["malformed", "misshapen", "rejected", "not-utf8"])
def test_a_bad_record_a_worker_finds_is_the_same_one_line_error(tmp_path, small_chunks, damage):
    records = [json.dumps(conversation(i)) for i in range(300)]
    bad = {"malformed": ["{not json", "[1, 2]"] * 4,   # more than the listed five, over several chunks
           "misshapen": [json.dumps({"text": "x"})],
           "rejected": [json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                                 {"role": "user", "content": "b"}, {"role": "system", "content": "c"}]})],
           "not-utf8": []}[damage]
    for offset, line in enumerate(bad):
        records[200 + 9 * offset] = line   # chunks far from the first
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(line + "\n" for line in records))
    if damage == "not-utf8":
        lines = path.read_bytes().split(b"\n")
        lines[250] = lines[250].replace(b'"q', b'"\xff', 1)
        path.write_bytes(b"\n".join(lines))
    if damage == "rejected":   # a template that refuses a system turn after the first
        template = tmp_path / "model"
        load_tokenizer(parse_recipe('model: "builtin:tiny"').model).save_pretrained(template)
        jinja = template / "chat_template.jinja"
        jinja.write_text("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
                         "{{ raise_exception('system only first') }}{% endif %}{% endfor %}" + jinja.read_text())
    cache = tmp_path / "cache"
    recipe = recipe_for([str(path)], cache, format="messages" if damage == "misshapen" else "auto")
    if damage == "rejected":
        recipe = parse_recipe(recipe.model_dump_json().replace('"builtin:tiny"', json.dumps(str(template))))
    one, two = refusal(recipe, 1), refusal(recipe, 2)
    assert one == two and one.count("\n") == (5 if damage == "malformed" else 0)
    with pytest.raises(DeepfleetError) as built:
        build_datasets(recipe.data, load_tokenizer(recipe.model), seed=3)
    assert built.value.render() == one
    assert f"{path}:2" in one and not cache.exists()
