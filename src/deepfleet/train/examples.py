"""What the data pipeline produces: tokenized examples and the report about them (no heavy imports:
the head reads prepared data without loading transformers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]      # IGNORE_INDEX (-100) where there is no loss

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, kw_only=True)
class DatasetReport:
    n_train: int
    n_validation: int
    n_truncated: int          # sequences cut to max_length (train + validation)
    n_tokens: int             # train tokens after truncation
    format: str               # the format of every source, or "a+b" when sources differ
    n_label_tokens: int = 0   # train tokens that carry loss
    n_without_answer: int = 0  # records dropped because no answer token was left (e.g. cut by truncation)
    max_length: int = 0
