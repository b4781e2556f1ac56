"""Packing isolation: a sequence's logits are the same packed with others as alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from deepfleet.train.batches import collate
from deepfleet.train.row_plan import pack_first_fit, plan_rows
from deepfleet.train.dataset import IGNORE_INDEX, TokenizedExample
from deepfleet.train.packed_attention import PER_SEQUENCE, sequence_bounds


def tiny_model(attn_implementation: str, config_class: type = LlamaConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_class(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def make_examples(lengths: list[int]) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in lengths:
        ids = torch.randint(1, 50, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return examples


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", PER_SEQUENCE])
def test_packed_logits_match_unpacked(attn_implementation, config_class):
    model = tiny_model(attn_implementation, config_class)
    examples = make_examples([7, 12, 5, 9, 3, 11])
    rows = [[0, 1, 2], [3, 4, 5], [2, 4]]  # uneven row lengths: the short row gets a padding segment
    batch = collate(rows, examples, pad_id=0, max_length=32, packing=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for row_number, row in enumerate(rows):
            offset = 0
            for index in row:
                ids = torch.tensor([examples[index].input_ids])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                part = packed[row_number, offset:offset + len(ids[0])]
                worst = max(worst, (alone - part).abs().max().item())
                offset += len(ids[0])
    assert worst < 1e-5, f"packed vs unpacked logits differ by {worst}"


def test_per_sequence_attention_gives_sdpa_gradients():
    examples = make_examples([7, 12, 5, 9, 3, 11])
    batch = collate([[0, 1, 2], [3, 4, 5], [2, 4]], examples, pad_id=0, max_length=32, packing=True)
    grads = {}
    for name in ("sdpa", PER_SEQUENCE):
        model = tiny_model(name).train()
        model(**batch, use_cache=False).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["sdpa"].abs().max() > 0
    assert (grads["sdpa"] - grads[PER_SEQUENCE]).abs().max().item() < 1e-5


def test_per_sequence_attention_falls_back_to_sdpa_with_a_kv_cache():
    # generate() calls with one query token and a cache: the stock sdpa path, same tokens.
    prompt = torch.tensor([[5, 9, 3, 17, 2]])
    outputs = [tiny_model(name).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
               for name in ("sdpa", PER_SEQUENCE)]
    assert outputs[0].tolist() == outputs[1].tolist()


def test_sequence_bounds_split_where_positions_restart():
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])
    assert sequence_bounds(positions) == [(0, 3), (3, 5), (5, 6), (6, 8)]


def test_packed_loss_is_the_token_weighted_mean_of_unpacked_losses():
    model = tiny_model("sdpa")
    examples = make_examples([6, 9, 4])
    batch = collate([[0, 1, 2]], examples, pad_id=0, max_length=32, packing=True)
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss.item()
        total = count = 0.0
        for example in examples:
            ids = torch.tensor([example.input_ids])
            n_targets = len(example.input_ids) - 1
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * n_targets
            count += n_targets
    assert abs(packed - total / count) < 1e-5


def test_packing_without_position_restart_would_leak():
    # The check above can fail: with plain 0..n positions the sequences see each other.
    model = tiny_model("sdpa")
    examples = make_examples([7, 12])
    batch = collate([[0, 1]], examples, pad_id=0, max_length=32, packing=True)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 7:]
        alone = model(input_ids=torch.tensor([examples[1].input_ids]), use_cache=False).logits[0]
    assert (leaky - alone).abs().max().item() > 1e-3


def test_packed_labels_masked_at_each_boundary():
    examples = make_examples([4, 3, 5])
    batch = collate([[0, 1, 2]], examples, pad_id=0, max_length=16, packing=True)
    labels = batch["labels"][0].tolist()
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert [labels[0], labels[4], labels[7]] == [IGNORE_INDEX] * 3
    assert labels[1:4] == examples[0].input_ids[1:]
    assert labels[5:7] == examples[1].input_ids[1:]


def test_packed_padding_is_its_own_segment_and_never_trained():
    examples = make_examples([6, 2, 2])
    batch = collate([[0], [1, 2]], examples, pad_id=0, max_length=16, packing=True)
    assert batch["input_ids"].shape == (2, 6)  # padded to the longest row, not to max_length
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 0, 1]
    assert batch["labels"][1, 4:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_first_fit_fills_earliest_row_with_room():
    rows = pack_first_fit([0, 1, 2, 3, 4], [6, 5, 4, 3, 2], max_length=10)
    assert rows == [[0, 2], [1, 3, 4]]


def test_first_fit_rows_never_exceed_max_length():
    examples = make_examples([(i * 37) % 29 + 1 for i in range(300)])
    rows = plan_rows(examples, max_length=40, packing=True, seed=3, epoch=0)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert max(sum(len(examples[i]) for i in row) for row in rows) <= 40
    total = sum(len(e) for e in examples)
    assert total / (len(rows) * 40) > 0.9  # first-fit leaves little room unused
