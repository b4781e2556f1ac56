"""From examples to micro batches: rows (packed or not), their order per epoch, each rank's share, tensors.

Everything is index-based and deterministic for (seed, epoch), so every rank computes the same
plan without talking to the others, and a resume at (epoch, step) only needs to skip rows.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from deepfleet.errors import DeepfleetError
from deepfleet.train.dataset import IGNORE_INDEX, TokenizedExample

Row = list[int]


class _FirstFitTree:
    """Max-segment tree over row capacities: finds the first row with room in O(log rows)."""

    def __init__(self, n_rows: int, capacity: int):
        self.size = 1
        while self.size < max(n_rows, 1):
            self.size *= 2
        self.room = [0] * (2 * self.size)
        for leaf in range(self.size, self.size + n_rows):
            self.room[leaf] = capacity
        for node in range(self.size - 1, 0, -1):
            self.room[node] = max(self.room[2 * node], self.room[2 * node + 1])

    def first_with_room(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.room[2 * node] >= length else 2 * node + 1
        return node - self.size

    def take(self, row: int, length: int) -> None:
        node = row + self.size
        self.room[node] -= length
        node //= 2
        while node:
            self.room[node] = max(self.room[2 * node], self.room[2 * node + 1])
            node //= 2


def pack_first_fit(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[Row]:
    """Put each example, in `order`, into the first row with room left; rows hold <= max_length tokens."""
    tree = _FirstFitTree(len(order), max_length)
    rows: list[Row] = []
    for index in order:
        length = lengths[index]
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens > max_length {max_length}")
        row = tree.first_with_room(length)
        tree.take(row, length)
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
    return rows


def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    return random.Random(f"deepfleet-{purpose}:{seed}:{epoch}")


def example_lengths(examples: Sequence[TokenizedExample]) -> list[int]:
    """Token counts; memory-mapped examples (prepared_data.MappedExamples) give them without reading tokens."""
    lengths = getattr(examples, "lengths", None)
    return lengths() if callable(lengths) else [len(example) for example in examples]


def plan_rows(examples: Sequence[TokenizedExample], *, max_length: int, packing: bool,
              seed: int, epoch: int) -> list[Row]:
    """The rows of one epoch, each a list of example indices (one index when not packing).

    Examples are shuffled for (seed, epoch); with packing they go first-fit into rows of
    `max_length` tokens and the rows are shuffled again, so short leftovers do not bunch at the end.
    """
    order = list(range(len(examples)))
    epoch_rng(seed, epoch, "order").shuffle(order)
    if not packing:
        return [[index] for index in order]
    rows = pack_first_fit(order, example_lengths(examples), max_length)
    epoch_rng(seed, epoch, "rows").shuffle(rows)
    return rows


def steps_in(n_rows: int, rows_per_step: int) -> int:
    """Optimizer steps one epoch of `n_rows` rows gives (the remainder is dropped)."""
    return n_rows // rows_per_step


def rank_rows(rows: list[Row], *, rank: int, world_size: int, rows_per_step: int) -> list[Row]:
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


def collate(rows: list[Row], examples: Sequence[TokenizedExample], *, pad_id: int, max_length: int,
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
