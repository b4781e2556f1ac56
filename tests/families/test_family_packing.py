"""Every family keeps packed sequences apart, under the attention deepfleet picks on CPU and the one it
would pick on a GPU (run here on CPU where it can run: sdpa and eager, and flash-attn's flattened
rows through the per-sequence kernel, which reads the same position_ids flash-attn's varlen path does).

A sequence's logits inside a packed row must equal its logits alone under transformers' eager
attention within 1e-5 (fp32). Rows hold sequences longer than the fixtures' sliding window (16), so
windows are exercised too.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deepfleet.errors import DeepfleetError
from deepfleet.train.batches import collate
from deepfleet.train.dataset import TokenizedExample
from deepfleet.train.families import FAMILIES, check_packing, choose_attention
from deepfleet.train.packed_attention import model_inputs

from family_models import FAMILIES as FIXTURE_FAMILIES

LENGTHS = [23, 7, 30, 12, 5, 19]
ROWS = [[0, 1, 2], [3, 4, 5], [1, 4]]   # uneven: the short row gets a padding segment
TOLERANCE = 1e-5


def examples(vocab_size: int) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(3)
    made = []
    for length in LENGTHS:
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        made.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return made


QUERY_KEY_WEIGHTS = ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight", "c_attn.weight")
SHARPEN = 12.0


def load(model_dir, implementation: str) -> torch.nn.Module:
    """The fixture model with query/key weights scaled up: random init gives near-uniform attention,
    where a wrong mask, window or soft-cap changes logits too little to see."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=implementation,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(QUERY_KEY_WEIGHTS):
                parameter.mul_(SHARPEN)
    return model


def packing_error(model: torch.nn.Module, batch: dict, items: list[TokenizedExample],
                  reference: torch.nn.Module) -> float:
    """Largest |logit difference| between each sequence packed (in `model`) and alone (in `reference`,
    transformers' eager attention: its own masks, windows and soft-capping)."""
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits.reshape(len(ROWS), -1, model.config.vocab_size)
        worst = 0.0
        for row_number, row in enumerate(ROWS):
            offset = 0
            for index in row:
                ids = torch.tensor([items[index].input_ids])
                alone = reference(input_ids=ids, use_cache=False).logits[0]
                worst = max(worst, (alone - packed[row_number, offset:offset + ids.shape[1]]).abs().max().item())
                offset += ids.shape[1]
    return worst


def packed_batch(choice, items: list[TokenizedExample]) -> dict:
    tensors = collate(ROWS, items, pad_id=0, max_length=128, packing=True)
    tensors.pop("labels")
    return model_inputs(tensors, block_mask=choice.block_mask, flatten_rows=choice.flatten_rows,
                        mask_dtype=torch.float32)


def test_fixture_families_are_the_supported_families():
    assert set(FIXTURE_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].packing != "refused"])
@pytest.mark.parametrize("device_type,flash", [("cpu", False), ("cuda", False), ("cuda", True)])
def test_packed_sequences_keep_apart_under_the_chosen_attention(family_models, family, device_type, flash):
    fixture = family_models[family]
    choice = choose_attention(FAMILIES[family], requested="auto", device_type=device_type, packed_rows=True,
                              flash_available=flash)
    implementation = choice.implementation
    if implementation == "flash_attention_2":
        # No flash-attn on CPU: its varlen split comes from the flattened row's position_ids, the same
        # input the per-sequence kernel splits on, so run that on the flattened batch.
        assert choice.flatten_rows
        implementation = choose_attention(FAMILIES[family], requested="auto", device_type="cpu",
                                          packed_rows=True, flash_available=False).implementation
    model = load(fixture.model_dir, implementation)
    items = examples(model.config.vocab_size)
    error = packing_error(model, packed_batch(choice, items), items, load(fixture.model_dir, "eager"))
    assert error < TOLERANCE, f"{family} under {choice.describe()}: packed logits differ by {error:.2e}"


def test_bloom_packing_would_leak_so_it_is_refused(family_models):
    model = load(family_models["bloom"].model_dir, "eager")
    items = examples(model.config.vocab_size)
    tensors = collate(ROWS, items, pad_id=0, max_length=128, packing=True)
    tensors.pop("labels")
    assert packing_error(model, tensors, items, model) > 1e-3   # the contamination the refusal prevents
    with pytest.raises(DeepfleetError, match="data.packing: false"):
        check_packing(FAMILIES["bloom"], packing=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed", [True, False])
def test_auto_attention_loads_every_family(family_models, family, packed):
    config = AutoConfig.from_pretrained(family_models[family].model_dir)
    for device_type in ("cpu", "cuda"):
        choice = choose_attention(FAMILIES[family], requested="auto", device_type=device_type,
                                  packed_rows=packed and FAMILIES[family].packing != "refused",
                                  flash_available=False)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=choice.implementation)
        assert model.config._attn_implementation == choice.implementation
