"""`train.compile` on each kind of family code: the compiled model trains as eager does, within 1e-5.

The model is compiled as DeepSpeed's `engine.compile` does it (torch.compile, inductor, dynamic shapes), loaded
with the attention deepfleet chooses for packed rows on CPU, and trained through the chunked loss on two packed
micro batches of different lengths. Compiling costs 5-20 s per family, so one family stands for each path:
per-sequence attention with GQA and a sliding window, MoE routing with its router loss, soft-capping, sdpa
with a boolean block mask, eager attention with an additive mask (ALiBi), and GPT-2's Conv1D layers. A run
of all 16 families (2026-12-02) gave the same losses, and gradients within 1.6e-7."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepfleet.train.batches import collate
from deepfleet.train.families import FAMILIES, choose_attention
from deepfleet.train.loss_head import choose_loss, model_loss
from deepfleet.train.packed_attention import model_inputs

from family_models import SPECS
from packed_logits import QUERY_KEY_WEIGHTS, ROWS, examples

VOCAB = 97
MICRO_BATCHES = (ROWS, [[1, 4], [0, 5]])     # rows of other lengths: the graphs must not specialise on them
FAMILY_PER_PATH = ("mistral", "qwen2_moe", "gemma2", "falcon", "bloom", "gpt2")


def cpu_attention(family: str):
    return choose_attention(FAMILIES[family], requested="auto", device_type="cpu", packed_rows=True,
                            flash_available=False)


def test_the_chosen_families_cover_every_attention_path():
    assert {cpu_attention(family) for family in FAMILY_PER_PATH} == {cpu_attention(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILY_PER_PATH)
def test_a_compiled_model_trains_as_eager(family):
    config = SPECS[family].config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    attention = cpu_attention(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.implementation).float().train()
    with torch.no_grad():     # sharper attention: random init attends almost uniformly, hiding mask errors
        for name, parameter in model.named_parameters():
            if name.endswith(QUERY_KEY_WEIGHTS):
                parameter.mul_(4.0)
    loss = choose_loss(model, requested="auto", device_type="cpu")
    assert loss.chunked, loss.why_plain
    extra = {"output_router_logits": True} if FAMILIES[family].is_moe else {}
    items = examples(VOCAB)

    def train_step(call, rows) -> tuple[float, dict[str, torch.Tensor]]:
        tensors = collate(rows, items, pad_id=0, max_length=128, packing=True)
        tensors = model_inputs(tensors, block_mask=attention.block_mask, flatten_rows=attention.flatten_rows,
                               mask_dtype=torch.float32)
        model.zero_grad()
        output = model_loss(call, model, loss, tensors, use_cache=False, **extra)
        output.loss.backward()
        return output.loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = [train_step(model, rows) for rows in MICRO_BATCHES]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="inductor", dynamic=True)
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):     # as compile_engine sets it
        got = [train_step(compiled, rows) for rows in MICRO_BATCHES]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0      # it did compile
    for (want_loss, want_grads), (got_loss, got_grads) in zip(eager, got):
        assert abs(got_loss - want_loss) <= 1e-5
        assert got_grads.keys() == want_grads.keys()
        for name, grad in got_grads.items():
            assert (grad - want_grads[name]).abs().max().item() <= 1e-5, name
