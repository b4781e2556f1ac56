"""Each data format and source type, answer-only labels, validation hold-out and truncation."""

from __future__ import annotations

import json
import logging

import pytest

from deepfleet.plan.recipe import DataSpec, ModelSpec, ValidationSpec
from deepfleet.train.data_sources import read_source
from deepfleet.train.dataset import IGNORE_INDEX, build_datasets, tokenize_conversation
from deepfleet.train.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "upper abc"}, {"role": "assistant", "content": "ABC"}],
    [{"role": "user", "content": "reverse wxyz"}, {"role": "assistant", "content": "zyxw"}],
    [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}],
]
LLAMA3_STYLE_TEMPLATE = (
    "{{ '<s>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Marks the end of the whole conversation, so a rendered prefix is not a prefix of the full text:
# exercises the fallback that locates assistant turns by their content.
END_MARKER_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}]{{ message['content'] }}</t>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% else %}<END>{% endif %}"
)


@pytest.fixture()
def tokenizer():
    return load_tokenizer(ModelSpec())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def trained_segments(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def build(tokenizer, paths, **kwargs):
    return build_datasets(DataSpec(train=paths, **kwargs), tokenizer, seed=0)


def test_messages_train_only_on_assistant_turns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    train, validation, report = build(tokenizer, [path])
    assert (report.format, report.n_train, validation) == ("messages", 3, [])
    assert trained_segments(tokenizer, train[0]) == ["ABC<|im_end|>"]
    assert tokenizer.decode(train[0].input_ids).startswith("<|im_start|>user\nupper abc")


def test_alpaca_and_sharegpt_match_messages(tmp_path, tokenizer):
    alpaca = [{"instruction": m[0]["content"], "input": "", "output": m[1]["content"]} for m in CONVERSATIONS]
    sharegpt = [{"conversations": [{"from": "human", "value": m[0]["content"]},
                                   {"from": "gpt", "value": m[1]["content"]}]} for m in CONVERSATIONS]
    messages = [{"messages": m} for m in CONVERSATIONS]
    results = {}
    for name, records in (("alpaca", alpaca), ("sharegpt", sharegpt), ("messages", messages)):
        train, _, report = build(tokenizer, [write_jsonl(tmp_path / f"{name}.jsonl", records)])
        assert report.format == name  # auto-detected
        results[name] = train
    assert results["alpaca"] == results["messages"] == results["sharegpt"]


def test_alpaca_input_and_system_are_used(tmp_path, tokenizer):
    record = {"instruction": "translate", "input": "hola", "output": "hello", "system": "be brief"}
    train, _, _ = build(tokenizer, [write_jsonl(tmp_path / "a.jsonl", [record])], format="alpaca")
    text = tokenizer.decode(train[0].input_ids)
    assert "<|im_start|>system\nbe brief" in text and "translate\n\nhola" in text
    assert trained_segments(tokenizer, train[0]) == ["hello<|im_end|>"]


def test_text_trains_on_every_token_but_the_first(tmp_path, tokenizer):
    train, _, report = build(tokenizer, [write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])])
    assert report.format == "text"
    example = train[0]
    assert tokenizer.decode(example.input_ids) == "hello world<|im_end|>"
    assert example.labels[0] == IGNORE_INDEX and example.labels[1:] == example.input_ids[1:]


def test_multi_turn_masks_every_user_turn(tokenizer):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    example = tokenize_conversation(tokenizer, messages)
    assert trained_segments(tokenizer, example) == ["a1<|im_end|>", "a2<|im_end|>"]


@pytest.mark.parametrize("template, expected", [
    # <|eot_id|> is plain characters for this tokenizer, so the answer is closed with its eos.
    (LLAMA3_STYLE_TEMPLATE, ["a1<|eot_id|>", "a2<|eot_id|><|im_end|>"]),
    (QWEN25_STYLE_TEMPLATE, ["a1<|im_end|>", "a2<|im_end|>"]),
    (END_MARKER_TEMPLATE, ["a1", "a2</t><END><|im_end|>"]),  # the last turn keeps the template's end marker
])
def test_answer_labels_follow_other_chat_templates(tokenizer, template, expected):
    tokenizer.chat_template = template
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert trained_segments(tokenizer, tokenize_conversation(tokenizer, messages)) == expected


def test_conversation_opening_with_assistant_turn_under_default_system_prompt(tokenizer):
    tokenizer.chat_template = QWEN25_STYLE_TEMPLATE
    messages = [{"role": "assistant", "content": "hi there"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    example = tokenize_conversation(tokenizer, messages)
    assert trained_segments(tokenizer, example) == ["hi there<|im_end|>", "a<|im_end|>"]


def test_json_parquet_and_saved_dataset_dirs_read_the_same(tmp_path, tokenizer):
    import datasets

    records = [{"messages": m} for m in CONVERSATIONS]
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved_dict"))
    reference, _, _ = build(tokenizer, [write_jsonl(tmp_path / "d.jsonl", records)])
    for source in ("d.json", "d.parquet", "saved", "saved_dict"):
        train, _, report = build(tokenizer, [str(tmp_path / source)])
        assert train == reference, source


def test_several_sources_of_different_formats(tmp_path, tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "abc"}, {"text": "def"}])
    train, _, report = build(tokenizer, [chat, text])
    assert report.n_train == 3 and report.format == "messages+text"


def test_validation_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    records = [{"text": f"line {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    spec = dict(validation=ValidationSpec(split=0.25))
    train, validation, report = build(tokenizer, [path], **spec)
    again, validation_again, _ = build(tokenizer, [path], **spec)
    assert (report.n_train, report.n_validation) == (30, 10)
    assert (train, validation) == (again, validation_again)
    texts = lambda xs: {tokenizer.decode(x.input_ids) for x in xs}
    assert not texts(train) & texts(validation) and len(texts(train) | texts(validation)) == 40


def test_validation_files(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CONVERSATIONS])
    held_path = write_jsonl(tmp_path / "held.jsonl", [{"messages": CONVERSATIONS[0]}])
    _, validation, report = build(tokenizer, [train_path], validation=ValidationSpec(files=[held_path]))
    assert report.n_validation == 1 and trained_segments(tokenizer, validation[0]) == ["ABC<|im_end|>"]


def test_builtin_tasks_with_builtin_heldout_validation(tokenizer):
    train, validation, report = build(tokenizer, ["builtin:tasks"], validation=ValidationSpec(files=["builtin:tasks"]))
    assert report.n_train == 20_000 and report.n_validation > 0 and report.format == "messages"
    held = {tokenizer.decode(x.input_ids) for x in validation}
    assert not held & {tokenizer.decode(x.input_ids) for x in train[:5000]}


def test_long_sequences_are_truncated_counted_and_warned_once(tmp_path, tokenizer, caplog):
    records = [{"text": "x" * 50} for _ in range(3)] + [{"text": "short"}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with caplog.at_level(logging.WARNING):
        train, _, report = build(tokenizer, [path], max_length=16)
    assert report.n_truncated == 3
    assert max(len(example) for example in train) == 16
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 4" in warnings[0].getMessage()


def test_answer_cut_off_by_truncation_is_dropped_and_counted(tmp_path, tokenizer):
    long_prompt = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": long_prompt}, {"messages": CONVERSATIONS[0]}])
    train, _, report = build(tokenizer, [path], max_length=40)
    assert report.n_train == 1 and report.n_without_answer == 1


@pytest.mark.parametrize("name, text", [
    ("bom.jsonl", '{"text": "one"}\n{"text": "two"}\n'),
    ("bom.json", '[{"text": "one"}, {"text": "two"}]'),
], ids=["jsonl", "json"])
def test_data_files_starting_with_a_byte_order_mark_are_read(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = read_source(str(path), key="data.train", seed=0)
    assert [r.fields for r in records] == [{"text": "one"}, {"text": "two"}]
    assert records[0].where in (f"{path}:1", f"{path} record 1")
