"""Bad data gives one DeepfleetError line per problem: what, where (file:line), how to fix."""

from __future__ import annotations

import json

import pytest

from deepfleet.errors import EXIT_BAD_INPUT, DeepfleetError
from deepfleet.plan.recipe import DataSpec, ModelSpec, ValidationSpec
from deepfleet.train.dataset import build_datasets
from deepfleet.train.tokenizer import load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture()
def tokenizer():
    return load_tokenizer(ModelSpec())


def build_error(tokenizer, paths, **kwargs) -> DeepfleetError:
    with pytest.raises(DeepfleetError) as caught:
        build_datasets(DataSpec(train=paths, **kwargs), tokenizer, seed=0)
    error = caught.value
    assert error.exit_code == EXIT_BAD_INPUT
    lines = error.render().splitlines()
    assert len(lines) == len(error.problems)
    assert all(line.startswith("error: ") and "(fix: " in line for line in lines)
    return error


def test_missing_file_names_the_path(tmp_path, tokenizer):
    error = build_error(tokenizer, [str(tmp_path / "nope.jsonl")])
    assert error.problems[0].where == str(tmp_path / "nope.jsonl")
    assert "not found" in error.problems[0].what


def test_unreadable_file(tmp_path, tokenizer):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    error = build_error(tokenizer, [str(path)])
    assert "not UTF-8 text (byte 0xff)" in error.problems[0].what and error.problems[0].where == f"{path}:1"


def test_bytes_that_are_not_utf8_are_reported_at_their_line(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    [problem] = build_error(tokenizer, [str(path)]).problems
    assert (problem.where, problem.what) == (f"{path}:2", "data file is not UTF-8 text (byte 0xe9)")


def test_unsupported_extension(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    assert ".jsonl" in build_error(tokenizer, [str(path)]).problems[0].fix


def test_every_malformed_jsonl_line_is_reported_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), "{oops", json.dumps(GOOD), "[1, 2]", "not json"]) + "\n")
    error = build_error(tokenizer, [str(path)])
    assert [p.where for p in error.problems] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "malformed JSON" in error.problems[0].what


def test_many_malformed_lines_are_capped_with_a_count(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text("{bad\n" * 12)
    error = build_error(tokenizer, [str(path)])
    assert len(error.problems) == 6
    assert "7 more" in error.problems[-1].what


def test_malformed_json_file_gives_its_line(tmp_path, tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    assert build_error(tokenizer, [str(path)]).problems[0].where == f"{path}:3"


def test_json_that_is_not_a_list(tmp_path, tokenizer):
    path = tmp_path / "obj.json"
    path.write_text('{"text": "a"}')
    assert "list of records" in build_error(tokenizer, [str(path)]).problems[0].what


def test_records_of_a_json_file_are_named_by_the_line_they_start_on(tmp_path, tokenizer):
    path = tmp_path / "records.json"
    path.write_text('[\n' + json.dumps(GOOD) + ',\n  "just text",\n\n  {"mesages": []},\n  [1,\n   2]\n]\n')
    error = build_error(tokenizer, [str(path)])
    assert [problem.where for problem in error.problems] == [f"{path}:3", f"{path}:6"]
    shaped = tmp_path / "shaped.json"
    shaped.write_text('[' + json.dumps(GOOD) + ',\n\n {"mesages": []}]')
    assert build_error(tokenizer, [str(shaped)]).problems[0].where == f"{shaped}:3"


def test_unknown_record_shape_lists_keys_seen_and_expected(tmp_path, tokenizer):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"mesages": [], "id": 3}) + "\n")
    problem = build_error(tokenizer, [str(path)]).problems[0]
    assert problem.where == f"{path}:1"
    assert "id, mesages" in problem.what and 'did you mean "messages"' in problem.what
    assert '"instruction"' in problem.fix and '"conversations"' in problem.fix


def test_records_that_do_not_fit_the_declared_format(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD, {"text": "x"}, {"messages": [{"role": "user"}]}, {"messages": "hi"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    error = build_error(tokenizer, [str(path)], format="messages")
    assert [p.where for p in error.problems] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "text" in error.problems[0].what and '"messages"' in error.problems[0].what
    assert '"content"' in error.problems[1].what


def test_sharegpt_unknown_speaker(tmp_path, tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "humann", "value": "hi"}]}) + "\n")
    assert 'did you mean "human"' in build_error(tokenizer, [str(path)]).problems[0].what


def test_empty_file(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    error = build_error(tokenizer, [str(path)])
    assert "no records" in error.problems[0].what and error.problems[0].where == str(path)


def test_dataset_with_no_answer_tokens_is_empty(tmp_path, tokenizer):
    path = tmp_path / "noanswer.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "no training example" in build_error(tokenizer, [str(path)]).problems[0].what


def test_messages_without_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = None
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    problem = build_error(tokenizer, [str(path)]).problems[0]
    assert "chat template" in problem.what and problem.where == str(path)
    assert "format: text" in problem.fix


def test_text_data_needs_no_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = None
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    _, _, report = build_datasets(DataSpec(train=[str(path)]), tokenizer, seed=0)
    assert report.n_train == 1


def test_template_that_rejects_a_conversation_names_the_record(tmp_path, tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "sys.jsonl"
    system = {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(system) + "\n")
    problem = build_error(tokenizer, [str(path)]).problems[0]
    assert problem.where == f"{path}:2" and "no system role" in problem.what


def test_split_and_files_together(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    validation = ValidationSpec(split=0.1, files=[str(path)])
    assert build_error(tokenizer, [str(path)], validation=validation).problems[0].where == "data.validation"


def test_split_that_leaves_nothing_to_train(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    error = build_error(tokenizer, [str(path)], validation=ValidationSpec(split=0.5))
    assert error.problems[0].where == "data.validation.split"


def test_directory_that_is_not_a_dataset(tmp_path, tokenizer):
    error = build_error(tokenizer, [str(tmp_path)])
    assert "not a saved HF dataset" in error.problems[0].what
