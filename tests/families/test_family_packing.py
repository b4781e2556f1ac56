"""Every family keeps packed sequences apart, under the attention deepfleet picks on CPU and the one it
would pick on a GPU (run here on CPU where it can run: sdpa and eager, and flash-attn's flattened
rows through the per-sequence kernel, which reads the same position_ids flash-attn's varlen path does).

A sequence's logits inside a packed row must equal its logits alone under transformers' eager
attention within 1e-5 (fp32). Rows hold sequences longer than the fixtures' sliding window (16), so
windows are exercised too.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from deepfleet.errors import DeepfleetError
from deepfleet.train.families import FAMILIES, check_packing, choose_attention

from family_models import FAMILIES as FIXTURE_FAMILIES
from packed_logits import examples, load, packed_batch, packed_tensors, packing_error

TOLERANCE = 1e-5


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
    assert packing_error(model, packed_tensors(items), items, model) > 1e-3   # the contamination the refusal prevents
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
