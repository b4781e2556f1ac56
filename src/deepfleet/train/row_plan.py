"""An epoch's rows of example indices: planned (shuffled, packed first-fit), held compactly, and
stored beside the prepared data.

A million examples as Python lists of lists took ~125 MiB and ~10 s to plan on every rank. A
RowPlan holds the same rows as two int64 arrays (CSR: every row's members end to end, and the row
boundaries), and slicing one (a rank's share, a step's rows) makes a view, not a copy. The head plans
the epochs a run reaches once, into the prepared-data entry, and every rank memory-maps them.
"""

from __future__ import annotations

import math
import os
import random
from array import array
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from deepfleet.plan.recipe import Recipe
from deepfleet.train.examples import TokenizedExample

Row = list[int]
MAX_STORED_EPOCHS = 8   # past these (little data, many epochs: quick to plan) the ranks plan for themselves


class RowPlan(Sequence[list[int]]):
    """Rows of example indices: row i holds members[starts[r]:starts[r + 1]] with r = order[i]."""

    def __init__(self, members: np.ndarray, starts: np.ndarray, order: np.ndarray | None = None):
        self.members, self.starts = members, starts
        self.order = np.arange(len(starts) - 1) if order is None else order

    @classmethod
    def of_rows(cls, members: np.ndarray, row_of: np.ndarray, n_rows: int) -> RowPlan:
        """The rows when `row_of[k]` is the row of members[k]: each row keeps its members' order."""
        by_row = np.argsort(row_of, kind="stable")
        starts = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=n_rows), out=starts[1:])
        return cls(np.asarray(members, dtype=np.int64)[by_row], starts)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return RowPlan(self.members, self.starts, self.order[index])
        row = int(self.order[index])
        return self.members[self.starts[row]:self.starts[row + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(mine == list(theirs) for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def reordered(self, order: Sequence[int]) -> RowPlan:
        return RowPlan(self.members, self.starts, self.order[np.asarray(order, dtype=np.int64)])

    def compacted(self) -> tuple[np.ndarray, np.ndarray]:
        """(members, starts) with the rows in this plan's order, as they are stored."""
        sizes = np.diff(self.starts)[self.order]
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        gather = np.repeat(self.starts[self.order] - starts[:-1], sizes) + np.arange(starts[-1], dtype=np.int64)
        return self.members[gather], starts


def pack_first_fit(order: Sequence[int], lengths: Sequence[int], max_length: int) -> RowPlan:
    """Put each example, in `order`, into the first row with room left; rows hold <= max_length tokens.

    A max-segment tree over the rows' room finds the first row with room in O(log rows); it is one
    loop with local names (a million examples take ~3 s), and an update stops at the first ancestor
    whose maximum did not change."""
    size = 1
    while size < len(order):
        size *= 2
    room = array("q", bytes(16 * size))
    for leaf in range(size, size + len(order)):
        room[leaf] = max_length
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    row_of = array("q", bytes(8 * len(order)))
    n_rows = 0
    for position, index in enumerate(order):
        length = lengths[index]
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens > max_length {max_length}")
        node = 1
        while node < size:
            node *= 2
            if room[node] < length:
                node += 1
        row = node - size
        room[node] -= length
        node >>= 1
        while node:
            left, right = room[2 * node], room[2 * node + 1]
            largest = left if left >= right else right
            if room[node] == largest:
                break
            room[node] = largest
            node >>= 1
        if row == n_rows:
            n_rows += 1
        row_of[position] = row
    return RowPlan.of_rows(np.asarray(order, dtype=np.int64), np.frombuffer(row_of, dtype=np.int64), n_rows)


def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    return random.Random(f"deepfleet-{purpose}:{seed}:{epoch}")


def example_lengths(examples: Sequence[TokenizedExample]) -> Sequence[int]:
    """Token counts; memory-mapped examples (prepared_data.MappedExamples) give them without reading tokens."""
    lengths = getattr(examples, "lengths", None)
    return lengths() if callable(lengths) else [len(example) for example in examples]


def plan_rows(examples: Sequence[TokenizedExample], *, max_length: int, packing: bool,
              seed: int, epoch: int) -> RowPlan:
    """The rows of one epoch, each a list of example indices (one index when not packing).

    Examples are shuffled for (seed, epoch); with packing they go first-fit into rows of
    `max_length` tokens and the rows are shuffled again, so short leftovers do not bunch at the end.
    Prepared data may hold the plan already (the head planned it once): then it is read, not planned.
    """
    stored = getattr(examples, "stored_rows", None)
    if callable(stored) and (plan := stored(max_length=max_length, packing=packing, seed=seed, epoch=epoch)):
        return plan
    return new_plan(examples, max_length=max_length, packing=packing, seed=seed, epoch=epoch)


def new_plan(examples: Sequence[TokenizedExample], *, max_length: int, packing: bool, seed: int, epoch: int) -> RowPlan:
    order = array("q", range(len(examples)))
    epoch_rng(seed, epoch, "order").shuffle(order)
    if not packing:
        return RowPlan(np.frombuffer(order, dtype=np.int64), np.arange(len(order) + 1, dtype=np.int64))
    rows = pack_first_fit(order, example_lengths(examples), max_length)
    row_order = array("q", range(len(rows)))
    epoch_rng(seed, epoch, "rows").shuffle(row_order)   # the same swaps as shuffling the rows themselves
    return rows.reordered(row_order)


def steps_in(n_rows: int, rows_per_step: int) -> int:
    """Optimizer steps one epoch of `n_rows` rows gives (the remainder is dropped)."""
    return n_rows // rows_per_step


def store_row_plans(entry: Path, train: Sequence[TokenizedExample], recipe: Recipe) -> None:
    """The plans of the epochs `recipe` reaches (at most MAX_STORED_EPOCHS), planned once into `entry`.
    An entry this user cannot write to only means the ranks plan for themselves."""
    data, schedule = recipe.data, recipe.train
    steps_left = schedule.max_steps
    epochs = MAX_STORED_EPOCHS if steps_left else min(MAX_STORED_EPOCHS, math.ceil(schedule.epochs))
    for epoch in range(epochs):
        options = dict(max_length=data.max_length, packing=data.packing, seed=schedule.seed, epoch=epoch)
        name = stored_plan_name(**options)
        rows = read_plan(entry, name, len(train))
        if rows is None:
            rows = new_plan(train, **options)
            try:
                write_plan(entry, name, rows)
            except OSError:
                return
        if steps_left is not None:
            steps = steps_in(len(rows), schedule.global_batch)
            if steps == 0 or steps >= steps_left:
                return
            steps_left -= steps


def stored_plan_name(*, packing: bool, max_length: int, seed: int, epoch: int) -> str:
    return f"rows-{'packed' if packing else 'single'}-{max_length}-{seed}-epoch{epoch}"


def write_plan(directory: Path, name: str, plan: RowPlan) -> None:
    """Both arrays, each written whole and renamed in (members first: starts marks the plan complete)."""
    for part, values in zip(("members", "starts"), plan.compacted()):
        path = directory / f"{name}.{part}.npy"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, values)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_plan(directory: Path, name: str, n_examples: int) -> RowPlan | None:
    """The stored plan, memory-mapped; None when there is none or it does not fit the examples."""
    try:
        members = np.load(directory / f"{name}.members.npy", mmap_mode="r")
        starts = np.load(directory / f"{name}.starts.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    whole = len(starts) >= 1 and starts[0] == 0 and starts[-1] == len(members) == n_examples
    return RowPlan(members, starts) if whole else None
