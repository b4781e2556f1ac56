"""Model FLOPs of training, counted the standard way (the MFU numerator).

For one sequence of real length s (padding never counts; each packed sequence counts alone):

    6 x N_trainable x s  +  4 x N_frozen x s  +  6 x n_layers x d_attn x s^2

- N: the parameters used in matmuls, i.e. all of them except the input embedding lookup tables
  (token and learned position embeddings). The output head counts, tied to the input embedding
  or not. MoE expert weights count for the share of experts a token visits (top-k / experts).
- A trained weight costs 2 FLOPs per token forward and 4 backward (input and weight gradients);
  a frozen one (LoRA's base model) 2 forward + 2 for the input gradient, no weight gradient.
- Causal attention: QK^T and AV cost 2 x d_attn FLOPs per query-key pair each, and a causal
  sequence has s^2 / 2 pairs, so 2 x d_attn x s^2 forward per layer; x3 for forward + backward.
  d_attn = num_attention_heads x head_dim. A sliding-window layer (window w < s) has
  w^2 / 2 + (s - w) x w pairs instead.
Recomputation under gradient checkpointing is not counted (that would be hardware FLOPs, not model FLOPs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass(frozen=True, kw_only=True)
class TrainingFlops:
    trainable_matmul_params: int   # in matmuls and trained: 6 FLOPs per token
    frozen_matmul_params: int      # in matmuls and frozen (LoRA's base): 4 FLOPs per token
    attention_width: int           # num_attention_heads x head_dim: the width of QK^T and AV
    layer_windows: tuple[int | None, ...]   # per layer: its sliding window in tokens, None for full causal

    def per_sequence(self, length: int) -> float:
        """Training FLOPs (forward + backward) of one sequence of `length` real tokens."""
        matmuls = (6 * self.trainable_matmul_params + 4 * self.frozen_matmul_params) * length
        pairs = sum(causal_pairs(length, window) for window in self.layer_windows)
        return matmuls + 3 * 4 * self.attention_width * pairs

    def of_sequences(self, lengths: Iterable[int]) -> float:
        return sum(self.per_sequence(length) for length in lengths)


def causal_pairs(length: int, window: int | None = None) -> float:
    """Query-key pairs causal attention computes: s^2 / 2, or fewer when each query sees at most `window` keys."""
    if window is None or length <= window:
        return length * length / 2
    return window * window / 2 + (length - window) * window


def training_flops_of(model: torch.nn.Module, config: Any = None) -> TrainingFlops:
    """The FLOP counts of `model` (an HF causal LM, PEFT-wrapped or partitioned by ZeRO-3 alike)."""
    config = config if config is not None else model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    lookups = _lookup_table_ids(model)
    expert_share = _expert_share(config)
    trainable = frozen = 0.0
    for name, parameter in model.named_parameters():   # tied weights appear once
        if id(parameter) in lookups:
            continue
        size = parameter_size(parameter) * (expert_share if "experts" in name.split(".") else 1.0)
        if parameter.requires_grad:
            trainable += size
        else:
            frozen += size
    return TrainingFlops(trainable_matmul_params=round(trainable), frozen_matmul_params=round(frozen),
                         attention_width=attention_width(config), layer_windows=layer_windows(config))


def parameter_size(parameter: torch.Tensor) -> int:
    """Elements of the full parameter: ZeRO-3 partitions record it in ds_numel, 4-bit weights in quant_state."""
    if hasattr(parameter, "ds_numel"):
        return int(parameter.ds_numel)
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()


def _lookup_table_ids(model: torch.nn.Module) -> set[int]:
    """Weights of the embedding tables (token, learned positions), except one that is also the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    return {id(module.weight) for module in model.modules()
            if isinstance(module, torch.nn.Embedding) and module.weight is not head_weight}


def _expert_share(config: Any) -> float:
    """The share of an MoE layer's experts a token goes through (1 for dense models)."""
    top_k = getattr(config, "num_experts_per_tok", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return top_k / experts if top_k and experts else 1.0


def attention_width(config: Any) -> int:
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full causal), from `layer_types` or one window for all layers."""
    window = getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", None) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(window if kind == "sliding_attention" else None for kind in types)
    return (window,) * config.num_hidden_layers
