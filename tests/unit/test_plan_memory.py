"""Parameter counts, LoRA trainable counts and the memory breakdown, checked against peft and DeepSpeed."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import model_to_params
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from deepfleet.plan.memory import (count_lora_params, estimate_activation_bytes, estimate_model_state_bytes,
                                   is_valid_zero_setting, largest_layer_params, model_shape_from_config)


def tiny_config(tie=False) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tie)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_count_matches_peft(targets):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    ours = count_lora_params(model, rank=8, target_modules=targets)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ours == trainable > 0


@pytest.mark.parametrize("tie", [False, True])
def test_counts_match_deepspeed_model_to_params(tie):
    model = AutoModelForCausalLM.from_config(tiny_config(tie))
    total, largest = model_to_params(model)
    shape = model_shape_from_config(tiny_config(tie))
    assert (shape.total_params, shape.largest_layer_params) == (total, largest)
    assert largest_layer_params(model) == largest


def test_lora_shape_adds_adapters_and_trains_only_them():
    full = model_shape_from_config(tiny_config())
    lora = model_shape_from_config(tiny_config(), method="lora", lora_rank=8)
    assert lora.trainable_params < full.total_params
    assert lora.total_params == full.total_params + lora.trainable_params


def test_lora_optimizer_states_shrink_with_trainable_params():
    full = model_shape_from_config(tiny_config())
    lora = model_shape_from_config(tiny_config(), method="lora", lora_rank=8)
    a = estimate_model_state_bytes(full, stage=2, offload="none", nodes=1, ranks_per_node=2)
    b = estimate_model_state_bytes(lora, stage=2, offload="none", nodes=1, ranks_per_node=2)
    assert b.optimizer_states == 8 * lora.trainable_params // 2
    assert a.optimizer_states == 8 * full.total_params // 2


def test_fp32_zero2_breakdown():
    """CPU ranks: fp32 model weights in full, cloned fp32 partition, fp32 grads and Adam states partitioned."""
    shape = model_shape_from_config(tiny_config())
    n = shape.total_params
    m = estimate_model_state_bytes(shape, stage=2, offload="none", nodes=1, ranks_per_node=2, precision="fp32")
    assert m.params == 4 * n
    assert m.master_params == 4 * n // 2
    assert m.optimizer_states == 8 * n // 2
    assert m.gradients == 4 * n // 2 + 4 * n // 2


def test_stages_shrink_per_rank_memory():
    shape = model_shape_from_config(tiny_config())
    sizes = [estimate_model_state_bytes(shape, stage=s, offload="none", nodes=2, ranks_per_node=4).device_bytes
             for s in (0, 1, 2)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_invalid_offload_combinations():
    assert not is_valid_zero_setting(2, "optimizer+params")
    assert not is_valid_zero_setting(0, "optimizer")
    assert is_valid_zero_setting(3, "optimizer+params")
    with pytest.raises(ValueError):
        estimate_model_state_bytes(model_shape_from_config(tiny_config()), stage=1, offload="optimizer+params",
                                   nodes=1, ranks_per_node=1)


def test_checkpointing_cuts_activations_and_scales_with_batch():
    shape = model_shape_from_config(tiny_config())
    one = estimate_activation_bytes(shape, micro_batch=1, seq_len=128, precision="bf16")
    four = estimate_activation_bytes(shape, micro_batch=4, seq_len=128, precision="bf16")
    assert one.with_checkpointing < one.without_checkpointing
    assert four.without_checkpointing == 4 * one.without_checkpointing
    eager = estimate_activation_bytes(shape, micro_batch=1, seq_len=128, precision="bf16", eager_attention=True)
    assert eager.without_checkpointing > one.without_checkpointing


def saved_activation_bytes(config, *, micro_batch, seq_len, checkpointing):
    """Bytes autograd keeps for backward in one real forward pass (parameters excluded, storages counted once)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("config", [
    LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=500),
    LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=2000),
])
def test_activation_estimate_against_saved_tensors(config):
    """Without checkpointing the estimate is within 15% of what autograd really saves; with checkpointing the
    estimate is an upper bound (it adds the layer being recomputed in backward, which forward never saves)."""
    estimate = estimate_activation_bytes(model_shape_from_config(config), micro_batch=2, seq_len=64,
                                         precision="fp32")
    measured = saved_activation_bytes(config, micro_batch=2, seq_len=64, checkpointing=False)
    assert abs(estimate.without_checkpointing - measured) <= 0.15 * measured, (estimate, measured)
    print(f"activations without checkpointing: estimate {estimate.without_checkpointing} measured {measured} "
          f"({estimate.without_checkpointing / measured - 1:+.1%})")
    measured_ckpt = saved_activation_bytes(config, micro_batch=2, seq_len=64, checkpointing=True)
    assert measured_ckpt <= estimate.with_checkpointing < estimate.without_checkpointing


def test_qlora_frozen_weights_are_four_bit():
    lora = model_shape_from_config(tiny_config(), method="lora", lora_rank=8)
    qlora = model_shape_from_config(tiny_config(), method="qlora", lora_rank=8)
    a = estimate_model_state_bytes(lora, stage=0, offload="none", nodes=1, ranks_per_node=1)
    b = estimate_model_state_bytes(qlora, stage=0, offload="none", nodes=1, ranks_per_node=1)
    frozen = lora.total_params - lora.trainable_params
    assert a.params - b.params == pytest.approx(frozen * (2 - 0.5 - 0.127 / 8), abs=2)
    assert a.optimizer_states == b.optimizer_states


def test_chunked_loss_counts_one_chunk_of_logits():
    shape = model_shape_from_config(LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                                                num_attention_heads=14, num_key_value_heads=2, vocab_size=152_064))
    plain = estimate_activation_bytes(shape, micro_batch=1, seq_len=4096, precision="bf16")
    chunked = estimate_activation_bytes(shape, micro_batch=1, seq_len=4096, precision="bf16", chunked_loss=True)
    layers = estimate_activation_bytes(shape, micro_batch=1, seq_len=4096, precision="bf16").without_checkpointing
    plain_logits = 4096 * 152_064 * (2 + 4)
    chunk_logits = 441 * 152_064 * (2 + 8) + 4 * 152_064 * 896 + 4096 * 896 * 2
    assert plain.without_checkpointing - chunked.without_checkpointing == plain_logits - chunk_logits
    assert plain.with_checkpointing - chunked.with_checkpointing == plain_logits - chunk_logits
    assert layers == plain.without_checkpointing


def test_the_plan_counts_the_chunked_loss_where_training_uses_it():
    from deepfleet.plan.memory import uses_chunked_loss
    assert uses_chunked_loss("auto", "cpu") and not uses_chunked_loss("auto", "cuda")
    assert uses_chunked_loss(True, "cuda") and not uses_chunked_loss(False, "cpu")
