"""Which micro batches a rank feeds at each optimizer step: a pure function of the step number.

The position in the data is never stored separately: epoch and step-in-epoch follow from the global
step, because the rows of every epoch are planned deterministically from (seed, epoch). A resume at
step k therefore only needs k (issue 3 stores it in the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from deepfleet.errors import DeepfleetError
from deepfleet.train.batches import collate, rank_rows
from deepfleet.train.row_plan import Row, RowPlan, plan_rows, steps_in
from deepfleet.train.dataset import TokenizedExample


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    real_tokens: int           # tokens that are not padding
    sequence_lengths: tuple[int, ...] = ()   # real length of each sequence, packed ones apart (for model FLOPs)


@dataclass(kw_only=True)
class DataOrder:
    examples: Sequence[TokenizedExample]
    max_length: int
    packing: bool
    seed: int
    rank: int
    world_size: int
    micro_batch: int
    grad_accum: int
    pad_id: int
    _cache: dict[int, RowPlan] = field(default_factory=dict, repr=False)

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def all_rows(self, epoch: int) -> RowPlan:
        if epoch not in self._cache:
            self._cache.clear()  # keep one epoch's plan in memory
            self._cache[epoch] = plan_rows(self.examples, max_length=self.max_length, packing=self.packing,
                                           seed=self.seed, epoch=epoch)
        return self._cache[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return steps_in(len(self.all_rows(epoch)), self.rows_per_step)

    def check_enough_rows(self) -> None:
        rows = len(self.all_rows(0))
        if rows < self.rows_per_step:
            unit = "packed rows" if self.packing else "examples"
            raise DeepfleetError(
                f"the training data gives {rows} {unit}, fewer than one global batch of {self.rows_per_step}",
                where="train.global_batch",
                fix=f"lower train.global_batch to at most {rows} (a multiple of micro_batch x ranks) or add data")

    def total_steps(self, *, epochs: float, max_steps: int | None) -> int:
        """max_steps when set; else whole epochs plus the fraction of the next one."""
        if max_steps is not None:
            return max_steps
        whole = int(epochs)
        steps = sum(self.steps_in_epoch(epoch) for epoch in range(whole))
        fraction = epochs - whole
        if fraction > 0:
            steps += int(math.ceil(fraction * self.steps_in_epoch(whole)))
        return max(steps, 1)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of global optimizer step `step` (0-based)."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def micro_batches(self, step: int) -> Iterator[MicroBatch]:
        """The grad_accum micro batches this rank feeds for global optimizer step `step`."""
        epoch, in_epoch = self.locate(step)
        mine = rank_rows(self.all_rows(epoch), rank=self.rank, world_size=self.world_size,
                         rows_per_step=self.rows_per_step)
        per_rank_step = self.micro_batch * self.grad_accum
        step_rows = mine[in_epoch * per_rank_step:(in_epoch + 1) * per_rank_step]
        for start in range(0, per_rank_step, self.micro_batch):
            rows = step_rows[start:start + self.micro_batch]
            yield self.collate(rows)

    def collate(self, rows: Sequence[Row]) -> MicroBatch:
        tensors = collate(rows, self.examples, pad_id=self.pad_id, max_length=self.max_length,
                          packing=self.packing)
        lengths = tuple(len(self.examples[index]) for row in rows for index in row)
        return MicroBatch(tensors=tensors, real_tokens=sum(lengths), sequence_lengths=lengths)


def validation_batches(order: DataOrder) -> Iterator[MicroBatch]:
    """Every rank's share of the validation rows, in equal counts (ZeRO-3 forwards are collective)."""
    rows = order.all_rows(0)
    per_round = order.micro_batch * order.world_size
    usable = len(rows) // per_round * per_round
    if usable == 0 and rows:
        # Fewer rows than ranks x micro batch: every rank still runs one forward on the same rows.
        yield order.collate(rows[: order.micro_batch])
        return
    mine = rank_rows(rows[:usable], rank=order.rank, world_size=order.world_size, rows_per_step=per_round)
    for start in range(0, len(mine), order.micro_batch):
        yield order.collate(mine[start:start + order.micro_batch])
