"""From an epoch's rows (row_plan.py) to micro batches: each rank's share of the rows, and their tensors.

Everything is index-based and deterministic for (seed, epoch), so every rank computes the same
plan without talking to the others, and a resume at (epoch, step) only needs to skip rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deepfleet.errors import DeepfleetError
from deepfleet.train.dataset import IGNORE_INDEX, TokenizedExample
from deepfleet.train.row_plan import Row, steps_in


def rank_rows(rows: Sequence[Row], *, rank: int, world_size: int, rows_per_step: int) -> Sequence[Row]:
    """The rows `rank` consumes, in order: for each step, every world_size-th row of that step's slice.

    `rows_per_step` is the global batch (micro * accumulation * world_size). Rows beyond the last
    full step are dropped, so every rank runs the same number of steps; ranks' rows are disjoint.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if rows_per_step <= 0 or rows_per_step % world_size:
        raise DeepfleetError(f"global batch {rows_per_step} is not a multiple of the {world_size} ranks",
                             where="train.global_batch",
                             fix=f"set train.global_batch to a multiple of micro_batch x {world_size}")
    kept = rows[: steps_in(len(rows), rows_per_step) * rows_per_step]
    return kept[rank::world_size]


def _row_tensors(row: Row, examples: Sequence[TokenizedExample]) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for index in row:
        example = examples[index]
        ids += example.input_ids
        # The first token of each sequence is never a target: it must not be predicted from the
        # previous packed sequence's last token.
        labels += [IGNORE_INDEX, *example.labels[1:]]
        positions += range(len(example.input_ids))
    return ids, labels, positions


def collate(rows: Sequence[Row], examples: Sequence[TokenizedExample], *, pad_id: int, max_length: int,
            packing: bool) -> dict[str, torch.Tensor]:
    """One micro batch: input_ids, labels, position_ids, and attention_mask only when unpacked rows need padding.

    Rows are padded to the longest row in the batch. Packed rows carry no attention_mask: position_ids
    restart at 0 for each sequence (padding included), which transformers turns into a mask that keeps
    sequences apart; the forward must run with use_cache=False for that.
    """
    built = [_row_tensors(row, examples) for row in rows]
    width = max(len(ids) for ids, _, _ in built)
    if width > max_length:
        raise ValueError(f"a row has {width} tokens > max_length {max_length}")
    input_ids, labels, position_ids, attention = [], [], [], []
    for ids, row_labels, positions in built:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        # Packed: padding is its own sequence (positions from 0). Unpacked: it is masked out anyway.
        position_ids.append(positions + list(range(pad)) if packing else list(range(width)))
        attention.append([1] * len(ids) + [0] * pad)
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }
    if not packing and any(0 in mask for mask in attention):
        batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
    return batch
