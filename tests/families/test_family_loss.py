"""Every family: the chunked loss equals the model's own loss and gradients within 1e-5 (fp32), MoE router
loss included, Gemma 2/3 soft-capping honoured; models whose logits it cannot reproduce fall back, saying why.

The models are built from each family's tiny config (family_models.SPECS) with a small vocabulary: no
tokenizer is needed, so this does not wait for the session's model dirs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig

from deepfleet.train.families import FAMILIES
from deepfleet.train.loss_head import choose_loss, model_loss

from family_models import SPECS

VOCAB = 97


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    config = SPECS[family].config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).float().train()


def batch() -> dict[str, torch.Tensor]:
    """Two packed rows: position_ids restart at each sequence, the first label of each sequence ignored."""
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, [0, 10]] = -100
    labels[0, 1:6] = -100                   # an answer-only prompt
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def loss_and_grads(model, choice, extra):
    model.zero_grad()
    output = model_loss(model, model, choice, batch(), use_cache=False, **extra)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def assert_same_training(model, extra=None):
    chunked = replace(choose_loss(model, requested=True, device_type="cpu"), chunk_tokens=7)
    assert chunked.chunked, chunked.why_plain
    plain = replace(chunked, chunked=False, why_plain="test")
    want, want_grads = loss_and_grads(model, plain, extra or {})
    got, got_grads = loss_and_grads(model, chunked, extra or {})
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5, (got.loss, want.loss)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert (grad - want_grads[name]).abs().max().item() <= 1e-5, name
    return chunked, got, want


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_loss_equals_the_models_own(family):
    model = tiny_model(family)
    extra = {"output_router_logits": True} if FAMILIES[family].is_moe else {}
    chunked, got, want = assert_same_training(model, extra)
    if FAMILIES[family].is_moe:
        assert want.aux_loss is not None and want.aux_loss > 0
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
    # The output layer is itself again afterwards: generation and evaluation see logits.
    logits = model(input_ids=batch()["input_ids"], use_cache=False).logits
    assert logits.shape == (2, 24, VOCAB)
    assert (chunked.softcap is not None) == (family == "gemma2")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_soft_capping_is_applied_once_and_restored(family):
    model = tiny_model(family, final_logit_softcapping=2.0)    # small: the cap changes the loss a lot
    chunked, _, _ = assert_same_training(model)
    assert chunked.softcap == 2.0 and model.config.final_logit_softcapping == 2.0


def test_lora_model_trains_the_same():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           lora_dropout=0.0))
    assert_same_training(model)


def test_falls_back_when_the_output_layer_is_wrapped():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    choice = choose_loss(model, requested=True, device_type="cpu")
    assert not choice.chunked
    assert choice.describe().startswith("plain cross-entropy (chunked loss not used: its output layer is a "
                                        "peft.tuners.lora.layer.Linear (LoRA-wrapped or quantized?), not a "
                                        "torch.nn.Linear")


def test_falls_back_when_the_config_scales_logits():
    config = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, logit_scale=0.0625, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    choice = choose_loss(model, requested=True, device_type="cpu")
    assert choice.describe() == ("plain cross-entropy (chunked loss not used: its config scales the logits after "
                                 "the output layer (logit_scale))")


def test_setting_and_device_decide_before_the_model():
    model = tiny_model("llama")
    assert choose_loss(model, requested=False, device_type="cpu").describe() == \
        "plain cross-entropy (train.chunked_loss: false)"
    assert choose_loss(model, requested="auto", device_type="cpu").chunked
    assert not choose_loss(model, requested="auto", device_type="cuda").chunked
    assert choose_loss(model, requested=True, device_type="cuda").chunked


def test_falls_back_in_fp16():
    choice = choose_loss(tiny_model("llama").half(), requested=True, device_type="cuda")
    assert not choice.chunked and "fp16" in choice.why_plain
