"""Answer-only labels under each family's real chat template: the trained tokens are exactly each
assistant turn plus the token that ends it, with and without `{% generation %}` markers, with a
system prompt and over several turns; one bos per sequence; every sequence ends with a token
`generate` stops on."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.chat_labels import IGNORE_INDEX
from deepfleet.train.dataset import tokenize_conversation
from deepfleet.train.generate import chat_prompt, generation_stop_ids
from deepfleet.train.tokenizer import load_tokenizer

from family_models import FAMILIES

ANSWERS = ["Paris is the capital of France.", "Rome, of course!", "It is 42."]
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": ANSWERS[0]}],
    "system prompt": [{"role": "system", "content": "You answer in one sentence."},
                      {"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": ANSWERS[0]}],
    "multi turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": ANSWERS[0]},
                   {"role": "user", "content": "And of Italy?"},
                   {"role": "assistant", "content": ANSWERS[1]},
                   {"role": "user", "content": "What is six times seven?"},
                   {"role": "assistant", "content": ANSWERS[2]}],
}


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CONVERSATIONS)
def test_trained_tokens_are_the_answers_and_their_end_of_turn(family_models, family, case):
    fixture = family_models[family]
    tokenizer = load_tokenizer(ModelSpec(name=str(fixture.model_dir)))
    messages = CONVERSATIONS[case]
    example = tokenize_conversation(tokenizer, messages)
    runs = trained_runs(example.input_ids, example.labels)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    end = tokenizer.convert_tokens_to_ids(fixture.end_of_turn)
    assert len(runs) == len(answers), (family, [tokenizer.decode(run) for run in runs])
    for run, answer in zip(runs, answers):
        assert run[-1] == end, (family, tokenizer.decode(run))
        assert tokenizer.decode(run[:-1]).strip() == answer, (family, tokenizer.decode(run))
    assert example.input_ids[-1] == end and example.labels[-1] == end
    bos = tokenizer.bos_token_id
    if fixture.bos_token or tokenizer("a")["input_ids"][:1] == [bos]:
        # Only the first bos is untrained: OPT's bos is also its eos, which ends every answer.
        assert [i for i, (token, label) in enumerate(zip(example.input_ids, example.labels))
                if token == bos and label == IGNORE_INDEX] == [0], family
    elif bos is not None and bos != tokenizer.eos_token_id:
        assert bos not in example.input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_on_the_token_training_ends_answers_with(family_models, family):
    fixture = family_models[family]
    tokenizer = load_tokenizer(ModelSpec(name=str(fixture.model_dir)))
    assert tokenizer.pad_token_id is not None   # filled in where the family has none
    model = AutoModelForCausalLM.from_pretrained(fixture.model_dir)
    example = tokenize_conversation(tokenizer, CONVERSATIONS["single turn"])
    assert example.input_ids[-1] in generation_stop_ids(model, tokenizer)
    # The prompt is the text training saw before the answer, bos included.
    prompt = chat_prompt(tokenizer, CONVERSATIONS["single turn"][:1])
    trained_text = chat_prompt(tokenizer, CONVERSATIONS["single turn"])  # ends with a new generation prompt
    assert trained_text.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids[:1] == example.input_ids[:1]
    assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in prompt_ids[1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_tokenizers_have_the_real_checkpoints_quirks(family_models, family):
    fixture = family_models[family]
    tokenizer = AutoTokenizer.from_pretrained(fixture.model_dir)
    assert (tokenizer.pad_token is not None) == fixture.has_pad_token
    assert ("{% generation %}" in tokenizer.chat_template) == fixture.generation_markers
