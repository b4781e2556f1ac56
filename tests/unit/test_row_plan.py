"""Row plans: the compact plan gives exactly the rows the list-based planner gave, and the head's
stored plans are what every rank maps instead of planning."""

import random
from pathlib import Path

import numpy as np
import pytest

from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.prepared_data import MappedExamples
from deepfleet.train.row_plan import (MAX_STORED_EPOCHS, RowPlan, new_plan, plan_rows, read_plan, store_row_plans,
                                      stored_plan_name)


def list_plan(lengths: list[int], *, max_length: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The planner as it was, with Python lists: the reference the compact plan must equal row for row."""
    order = list(range(len(lengths)))
    random.Random(f"deepfleet-order:{seed}:{epoch}").shuffle(order)
    if not packing:
        return [[index] for index in order]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        row = next((i for i, left in enumerate(room) if left >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(max_length)
        rows[row].append(index)
        room[row] -= lengths[index]
    random.Random(f"deepfleet-rows:{seed}:{epoch}").shuffle(rows)
    return rows


def mapped(lengths: list[int], entry: Path | None = None) -> MappedExamples:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.zeros(int(offsets[-1]), dtype=np.int32)
    return MappedExamples(tokens, tokens, offsets, plans=entry)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("packing", [True, False])
def test_the_compact_plan_is_the_list_plan(seed, packing):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 3, rng.randint(1, 64), 64]) for _ in range(rng.randint(1, 700))]
    for epoch in (0, 3):
        options = dict(max_length=64, packing=packing, seed=seed, epoch=epoch)
        plan = plan_rows(mapped(lengths), **options)
        assert isinstance(plan, RowPlan)
        assert [row for row in plan] == list_plan(lengths, **options)


def test_slices_are_views_of_the_same_rows():
    plan = RowPlan.of_rows(np.array([5, 6, 7, 8]), np.array([1, 0, 1, 2]), 3).reordered([2, 0, 1])
    assert list(plan) == [[8], [6], [5, 7]]
    assert list(plan[1:]) == [[6], [5, 7]] and list(plan[::2]) == [[8], [5, 7]]
    assert plan[1:].members is plan.members
    members, starts = plan.compacted()
    assert list(RowPlan(members, starts)) == list(plan)


def test_the_head_stores_the_epochs_the_run_reaches_and_ranks_map_them(tmp_path):
    lengths = [(i * 7) % 30 + 3 for i in range(400)]
    recipe = parse_recipe("data: {max_length: 64}\ntrain: {global_batch: 16, epochs: 2.5, seed: 4}\n")
    store_row_plans(tmp_path, mapped(lengths), recipe)
    stored = sorted(p.name for p in tmp_path.iterdir())
    assert stored == sorted(f"{stored_plan_name(packing=True, max_length=64, seed=4, epoch=e)}.{part}.npy"
                            for e in range(3) for part in ("members", "starts"))
    rank_view = plan_rows(mapped(lengths, tmp_path), max_length=64, packing=True, seed=4, epoch=2)
    assert isinstance(rank_view.members, np.memmap)
    assert rank_view == list_plan(lengths, max_length=64, packing=True, seed=4, epoch=2)


def test_max_steps_stores_only_the_epochs_it_reaches(tmp_path):
    lengths = [10] * 64   # 6 examples per row: 11 rows, 2 steps of 4 rows per epoch
    store_row_plans(tmp_path, mapped(lengths), parse_recipe("data: {max_length: 64}\ntrain: {global_batch: 4, max_steps: 3}\n"))
    assert len(list(tmp_path.iterdir())) == 2 * 2
    store_row_plans(tmp_path, mapped(lengths), parse_recipe("data: {max_length: 64}\ntrain: {global_batch: 4, max_steps: 1000}\n"))
    assert len(list(tmp_path.iterdir())) == 2 * MAX_STORED_EPOCHS


def test_a_damaged_or_foreign_plan_is_planned_again(tmp_path):
    lengths = [5, 9, 12, 3, 30, 8]
    name = stored_plan_name(packing=True, max_length=32, seed=0, epoch=0)
    store_row_plans(tmp_path, mapped(lengths), parse_recipe("data: {max_length: 32}\ntrain: {seed: 0, max_steps: 1, global_batch: 2}\n"))
    assert read_plan(tmp_path, name, len(lengths)) is not None
    assert read_plan(tmp_path, name, len(lengths) + 1) is None           # another entry's examples
    (tmp_path / f"{name}.starts.npy").write_bytes(b"\x93NUMPY broken")
    assert read_plan(tmp_path, name, len(lengths)) is None
    expected = new_plan(mapped(lengths), max_length=32, packing=True, seed=0, epoch=0)
    assert plan_rows(mapped(lengths, tmp_path), max_length=32, packing=True, seed=0, epoch=0) == expected


def test_an_entry_the_user_cannot_write_is_left_as_it_is(tmp_path):
    (tmp_path / "file").write_text("")
    store_row_plans(tmp_path / "file", mapped([4, 4]), parse_recipe("train: {max_steps: 1, global_batch: 2}\n"))
