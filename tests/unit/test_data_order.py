"""The data position is a pure function of the global step: epochs, ranks and resume agree."""

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.train.data_order import DataOrder, validation_batches
from deepfleet.train.dataset import TokenizedExample


def examples(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(input_ids=[i + 1] * (3 + i % 7), labels=[i + 1] * (3 + i % 7))
            for i in range(n)]


def order(rank: int, *, n: int = 50, packing: bool = False, world: int = 2, micro: int = 2, accum: int = 2):
    return DataOrder(examples=examples(n), max_length=32, packing=packing, seed=5, rank=rank, world_size=world,
                     micro_batch=micro, grad_accum=accum, pad_id=0)


def ids_of(batch) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in batch.tensors["input_ids"]]


def test_epochs_follow_each_other_and_total_steps_counts_whole_and_partial_epochs():
    first = order(0)
    per_epoch = first.steps_in_epoch(0)
    assert per_epoch == 50 // 8
    assert first.locate(0) == (0, 0)
    assert first.locate(per_epoch - 1) == (0, per_epoch - 1)
    assert first.locate(per_epoch) == (1, 0)
    assert first.total_steps(epochs=2, max_steps=None) == 2 * per_epoch
    assert first.total_steps(epochs=1.5, max_steps=None) == per_epoch + 3
    assert first.total_steps(epochs=1, max_steps=100) == 100


def test_ranks_see_disjoint_examples_with_the_configured_accumulation():
    per_step = {}
    for rank in (0, 1):
        ranked = order(rank)
        for step in range(ranked.steps_in_epoch(0)):
            batches = list(ranked.micro_batches(step))
            assert len(batches) == 2 and all(len(b.tensors["input_ids"]) == 2 for b in batches)
            firsts = [row[0] for b in batches for row in ids_of(b)]  # token = example index + 1
            per_step.setdefault(step, []).append(firsts)
    everything = []
    for step, (mine, theirs) in per_step.items():
        assert not set(mine) & set(theirs)
        assert len(mine) + len(theirs) == 8
        everything += mine + theirs
    assert len(everything) == len(set(everything)) == 48  # one epoch, remainder of 50 dropped


def test_a_fresh_order_at_step_k_feeds_exactly_what_the_running_one_fed():
    running = order(1, packing=True, n=200)
    expected = [ids_of(b) for b in running.micro_batches(7)]
    resumed = order(1, packing=True, n=200)  # a new process after a restart
    assert [ids_of(b) for b in resumed.micro_batches(7)] == expected
    assert resumed.micro_batches(7).__next__().real_tokens > 0


def test_micro_batches_know_each_packed_sequence_length_without_padding():
    for packing in (True, False):
        for batch in order(0, packing=packing, n=200).micro_batches(3):
            rows = batch.tensors["input_ids"]
            lengths = batch.sequence_lengths
            assert sum(lengths) == batch.real_tokens == int((rows != 0).sum())   # pad id 0, token ids from 1
            assert len(lengths) >= len(rows) if packing else len(lengths) == len(rows)
            assert all(3 <= length <= 9 for length in lengths)


def test_too_little_data_for_one_global_batch_is_a_clear_error():
    with pytest.raises(DeepfleetError) as info:
        order(0, n=5).check_enough_rows()
    assert "fewer than one global batch of 8" in info.value.render()


def test_validation_gives_every_rank_the_same_number_of_batches():
    counts = [len(list(validation_batches(order(rank, n=13, accum=1)))) for rank in (0, 1)]
    assert counts[0] == counts[1] == 3
    tiny = [len(list(validation_batches(order(rank, n=3, accum=1)))) for rank in (0, 1)]
    assert tiny == [1, 1]
