"""The built-in tasks and the builtin:tiny model config."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.builtin import (builtin_model_config, builtin_task_records, exact_match,
                                     heldout_prompts)
from deepfleet.train.builtin_tasks import TASKS, generate_examples
from deepfleet.train.tokenizer import load_tokenizer


def prompts_of(records) -> set[str]:
    return {record["messages"][0]["content"] for record in records}


def test_records_are_deterministic_messages():
    first = builtin_task_records(300, seed=5, split="train")
    assert first == builtin_task_records(300, seed=5, split="train")
    assert first != builtin_task_records(300, seed=6, split="train")
    roles = {tuple(m["role"] for m in record["messages"]) for record in first}
    assert roles == {("user", "assistant")}


def test_train_and_heldout_never_share_a_prompt():
    train = prompts_of(builtin_task_records(20_000, seed=1, split="train"))
    heldout = prompts_of(builtin_task_records(2_000, seed=2, split="heldout"))
    assert not train & heldout
    assert len(heldout) > 500  # mostly distinct prompts, not a handful repeated


def test_every_task_is_in_both_splits_and_answers_are_right():
    for split in ("train", "heldout"):
        examples = generate_examples(30, seed=3, split=split)
        assert {example.task for example in examples} == set(TASKS)
        for example in examples:
            operation, *args = example.prompt.split()
            expected = {"upper": lambda: args[0].upper(), "reverse": lambda: args[0][::-1],
                        "add": lambda: str(int(args[0]) + int(args[1]))}[operation]()
            assert example.answer == expected


def test_heldout_prompts_pair_prompt_and_answer():
    pairs = heldout_prompts(12, seed=0)
    assert len(pairs) == 12
    messages, answer = pairs[0]
    assert [m["role"] for m in messages] == ["user"] and answer
    records = builtin_task_records(12, seed=0, split="heldout")
    assert [r["messages"][1]["content"] for r in records] == [a for _, a in pairs]


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" ABC\n", "ABC")
    assert not exact_match("ABD", "ABC")
    assert not exact_match("abc", "ABC")


def test_builtin_model_config_builds_a_small_llama():
    tokenizer = load_tokenizer(ModelSpec())
    config = builtin_model_config(tokenizer)
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 5e6
    ids = torch.tensor([tokenizer("upper abc")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
