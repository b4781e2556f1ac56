"""Row order, rank sharding and collation of unpacked rows."""

from __future__ import annotations

import pytest
import torch

from deepfleet.errors import DeepfleetError
from deepfleet.train.batches import collate, rank_rows
from deepfleet.train.row_plan import plan_rows, steps_in
from deepfleet.train.dataset import IGNORE_INDEX, TokenizedExample


def examples_of(lengths: list[int]) -> list[TokenizedExample]:
    return [TokenizedExample(input_ids=[i + 1] * n, labels=[IGNORE_INDEX] + [i + 1] * (n - 1))
            for i, n in enumerate(lengths)]


EXAMPLES = examples_of([(i * 13) % 17 + 2 for i in range(103)])


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_get_disjoint_rows_that_cover_every_kept_row(packing):
    rows = plan_rows(EXAMPLES, max_length=32, packing=packing, seed=7, epoch=0)
    world, per_step = 2, 8
    shares = [rank_rows(rows, rank=r, world_size=world, rows_per_step=per_step) for r in range(world)]
    kept = steps_in(len(rows), per_step) * per_step
    assert len(shares[0]) == len(shares[1]) == kept // world
    flat = [tuple(row) for share in shares for row in share]
    assert len(set(flat)) == len(flat) == kept  # disjoint
    assert sorted(flat) == sorted(tuple(row) for row in rows[:kept])  # together: every kept row
    assert len(rows) - kept < per_step  # only the remainder is dropped


def test_each_step_uses_the_steps_own_rows():
    rows = [[i] for i in range(12)]
    share = rank_rows(rows, rank=1, world_size=3, rows_per_step=6)
    assert share == [[1], [4], [7], [10]]


@pytest.mark.parametrize("packing", [False, True])
def test_order_is_reproducible_and_changes_per_epoch(packing):
    first = plan_rows(EXAMPLES, max_length=32, packing=packing, seed=7, epoch=0)
    again = plan_rows(EXAMPLES, max_length=32, packing=packing, seed=7, epoch=0)
    next_epoch = plan_rows(EXAMPLES, max_length=32, packing=packing, seed=7, epoch=1)
    other_seed = plan_rows(EXAMPLES, max_length=32, packing=packing, seed=8, epoch=0)
    assert first == again
    assert first != next_epoch and first != other_seed
    assert sorted(i for row in next_epoch for i in row) == list(range(len(EXAMPLES)))


def test_unpacked_rows_hold_one_example_each():
    rows = plan_rows(EXAMPLES, max_length=32, packing=False, seed=1, epoch=0)
    assert all(len(row) == 1 for row in rows)
    assert sorted(row[0] for row in rows) == list(range(len(EXAMPLES)))


def test_global_batch_not_divisible_by_ranks_is_a_recipe_error():
    with pytest.raises(DeepfleetError, match="train.global_batch"):
        rank_rows([[0]] * 10, rank=0, world_size=3, rows_per_step=4)


def test_unpacked_collate_pads_to_longest_row_with_attention_mask():
    examples = examples_of([3, 5])
    batch = collate([[0], [1]], examples, pad_id=0, max_length=64, packing=False)
    assert batch["input_ids"].tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 1, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    assert all(t.dtype == torch.long for t in batch.values())


def test_unpacked_collate_without_padding_has_no_attention_mask():
    batch = collate([[0], [1]], examples_of([4, 4]), pad_id=0, max_length=64, packing=False)
    assert "attention_mask" not in batch


def test_collate_rejects_rows_longer_than_max_length():
    with pytest.raises(ValueError):
        collate([[0]], examples_of([9]), pad_id=0, max_length=8, packing=False)
