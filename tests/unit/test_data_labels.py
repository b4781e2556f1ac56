"""Answer-only labels with a subword (byte-level BPE) tokenizer, and the no-offsets fallback."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.chat_labels import IGNORE_INDEX
from deepfleet.train.dataset import tokenize_conversation
from deepfleet.train.tokenizer import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for m in MESSAGES] * 20 + ["user\nassistant\n the of is"] * 20
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_subword_tokens_match_plain_tokenization_and_labels_cover_answers(bpe_tokenizer):
    example = tokenize_conversation(bpe_tokenizer, MESSAGES)
    text = bpe_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    # The template's newline after the last <|im_end|> carries no loss and is dropped.
    assert example.input_ids == bpe_tokenizer(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    assert trained_text(bpe_tokenizer, example) == "Paris is the capital of France.<|im_end|>Rome.<|im_end|>"
    assert "What" not in trained_text(bpe_tokenizer, example)


def test_tokenizer_without_offsets_gives_the_same_labels(monkeypatch):
    tokenizer = load_tokenizer(ModelSpec())
    fast = tokenize_conversation(tokenizer, MESSAGES)
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    assert not tokenizer.is_fast
    assert tokenize_conversation(tokenizer, MESSAGES) == fast
