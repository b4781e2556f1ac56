"""The standard FLOP count on tiny models of each kind of family, against numbers worked out by hand."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from deepfleet.train.flops import TrainingFlops, causal_pairs, parameter_size, training_flops_of

VOCAB, HIDDEN = 100, 64


def build(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def llama(**extra) -> torch.nn.Module:
    return build(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          **extra))


# Llama, hidden 64, MLP 128, 4 heads of 16, 2 KV heads: q 64x64, k and v 32x64, o 64x64, gate/up/down
# 64x128 each, two norms of 64 per layer; a final norm of 64; the head 100x64.
LLAMA_LAYER = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128 + 2 * 64
LLAMA_MATMUL = 2 * LLAMA_LAYER + 64 + VOCAB * 64        # 80,448: everything but the 100x64 input embedding


def test_llama_untied_counts_the_head_but_not_the_input_embedding():
    counts = training_flops_of(llama(tie_word_embeddings=False))
    assert counts == TrainingFlops(trainable_matmul_params=80_448, frozen_matmul_params=0, attention_width=64,
                                   layer_windows=(None, None))
    assert LLAMA_MATMUL == 80_448
    # s = 10: 6 x 80,448 x 10 matmul FLOPs + 3 x 2 layers x 2 x 64 x 10^2 attention FLOPs.
    assert counts.per_sequence(10) == 6 * 80_448 * 10 + 3 * 2 * 2 * 64 * 100 == 4_903_680


def test_a_tied_head_counts_once_as_a_matmul():
    model = llama(tie_word_embeddings=True)
    counts = training_flops_of(model)
    assert counts.trainable_matmul_params == LLAMA_MATMUL == sum(p.numel() for p in model.parameters())


def test_packed_sequences_count_alone_so_attention_grows_with_each_length_squared():
    counts = training_flops_of(llama(tie_word_embeddings=False))
    packed = counts.of_sequences([10, 6])      # one row of 16 real tokens holding two sequences
    assert packed == counts.per_sequence(10) + counts.per_sequence(6)
    assert packed < counts.per_sequence(16)
    assert packed - 6 * 80_448 * 16 == 3 * 2 * 2 * 64 * (100 + 36)


def test_gpt2_leaves_out_its_learned_positions_and_counts_conv1d_weights_and_biases():
    counts = training_flops_of(build(transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4,
                                                             n_positions=32)))
    layer = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)   # norms, Conv1D
    assert counts.trainable_matmul_params == layer + 2 * 64 + VOCAB * 64 == 56_512    # + ln_f, tied head (no wpe)
    assert counts.attention_width == 64 and counts.layer_windows == (None,)


def test_opt_leaves_out_embed_positions_and_counts_its_projections():
    counts = training_flops_of(build(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128,
                                                            num_hidden_layers=1, num_attention_heads=4,
                                                            word_embed_proj_dim=32, max_position_embeddings=32)))
    layer = 4 * (64 * 64 + 64) + (128 * 64 + 128) + (64 * 128 + 64) + 2 * 2 * 64
    projections = 2 * 32 * 64                           # project_in 64x32 and project_out 32x64, no bias
    assert counts.trainable_matmul_params == layer + projections + 2 * 64 + VOCAB * 32 == 40_896


def test_gemma_attention_width_is_heads_times_head_dim_not_hidden():
    counts = training_flops_of(build(transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=4, head_dim=16,
                                                              num_key_value_heads=1)))
    layer = 32 * 64 + 2 * 32 * 16 + 64 * 32 + 3 * 32 * 64 + 2 * 32
    assert counts.trainable_matmul_params == layer + 32 + VOCAB * 32      # tied head
    assert counts.attention_width == 64


def test_sliding_window_layers_attend_to_at_most_the_window():
    counts = training_flops_of(build(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, num_key_value_heads=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])))
    assert counts.layer_windows == (16, None)
    assert causal_pairs(40, 16) == 16 * 16 / 2 + 24 * 16 and causal_pairs(10, 16) == causal_pairs(10) == 50
    attention = counts.per_sequence(40) - 6 * counts.trainable_matmul_params * 40
    assert attention == 3 * 4 * 64 * (causal_pairs(40, 16) + causal_pairs(40))


def test_moe_experts_count_for_the_share_a_token_visits():
    model = build(transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2))
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert experts == 4 * 3 * 64 * 128
    attention = 64 * 64 + 2 * 32 * 64 + 64 * 64
    router, norms = 4 * 64, 3 * 64
    assert training_flops_of(model).trainable_matmul_params == (attention + router + norms + experts // 2
                                                                + VOCAB * 64)


def test_lora_base_weights_count_as_frozen_and_adapters_as_trained():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(llama(tie_word_embeddings=False),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    counts = training_flops_of(model)
    adapters = 2 * (4 * (64 + 64) + 4 * (64 + 32))      # per layer: q 64->64 and v 64->32, rank 4 A and B
    assert counts.trainable_matmul_params == adapters
    assert counts.frozen_matmul_params == LLAMA_MATMUL
    assert counts.per_sequence(10) == (6 * adapters + 4 * LLAMA_MATMUL) * 10 + 3 * 2 * 2 * 64 * 100


def test_full_sizes_of_zero3_partitions_and_4bit_weights():
    partition = torch.nn.Parameter(torch.zeros(0))
    partition.ds_numel = 4096
    packed = torch.nn.Parameter(torch.zeros(8, 1), requires_grad=False)
    packed.quant_state = type("QuantState", (), {"shape": torch.Size([4, 4])})()
    assert (parameter_size(partition), parameter_size(packed), parameter_size(torch.zeros(3, 5))) == (4096, 16, 15)


@pytest.mark.parametrize("length", [1, 7, 512])
def test_causal_pairs_without_a_window_are_half_the_square(length):
    assert causal_pairs(length) == causal_pairs(length, None) == length ** 2 / 2


SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
OTHER_FAMILIES = {   # config -> the input lookup tables it has (the rest, tied heads included, are matmuls)
    "falcon": (transformers.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                                         alibi=False, bias=False), []),
    "bloom": (transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4), []),
    "gpt_neox": (transformers.GPTNeoXConfig(**SMALL), ["gpt_neox.embed_in.weight"]),
    "qwen2": (transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True), []),
    "phi3": (transformers.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0), ["model.embed_tokens.weight"]),
    "gemma3_text": (transformers.Gemma3TextConfig(**dict(SMALL, hidden_size=32), head_dim=16, num_key_value_heads=2,
                                                  sliding_window=16), []),
}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_families_count_every_parameter_but_their_input_lookup_tables(family):
    config, lookup_tables = OTHER_FAMILIES[family]
    model = build(config)
    counts = training_flops_of(model)
    expected = sum(p.numel() for name, p in model.named_parameters() if name not in lookup_tables)
    assert counts.trainable_matmul_params == expected
    assert counts.attention_width == 64 and len(counts.layer_windows) == 2
