"""Exact-match accuracy of a model on the built-in tasks' held-out prompts (what `deepfleet demo` prints)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from deepfleet.train.builtin import exact_match, heldout_prompts
from deepfleet.train.generate import generate_answers


@dataclass(frozen=True, kw_only=True)
class HeldoutResult:
    prompt: str
    expected: str
    answer: str

    @property
    def correct(self) -> bool:
        return exact_match(self.answer, self.expected)


@dataclass(frozen=True, kw_only=True)
class HeldoutReport:
    results: list[HeldoutResult]

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.results) / max(len(self.results), 1)


def evaluate_heldout(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, n: int, seed: int,
                     max_new_tokens: int = 48) -> HeldoutReport:
    prompts = heldout_prompts(n, seed=seed)
    answers = generate_answers(model, tokenizer, [messages for messages, _ in prompts],
                               max_new_tokens=max_new_tokens)
    return HeldoutReport(results=[
        HeldoutResult(prompt=messages[-1]["content"], expected=expected, answer=answer)
        for (messages, expected), answer in zip(prompts, answers)
    ])
