"""Memory estimate from a model config alone: parameter counts on the meta device, model states, activations.

Model states follow DeepSpeed's own accounting (`estimate_zero2_model_states_mem_needs` in
deepspeed/runtime/zero/stage_1_and_2.py and `estimate_zero3_model_states_mem_needs` in stage3.py),
broken into the tensors they stand for, so the planner can also cover what the estimators do not:
ZeRO-0/1, LoRA (optimizer states only for trainable parameters) and fp32 CPU ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

if TYPE_CHECKING:   # torch is imported where a model is built, so `deepfleet --help` stays fast
    from torch import nn

Offload = Literal["none", "optimizer", "optimizer+params"]
Precision = Literal["bf16", "fp16", "fp32"]
OFFLOADS: tuple[Offload, ...] = ("none", "optimizer", "optimizer+params")
STAGES = (0, 1, 2, 3)

# 4-bit NF4 weights plus 0.127 bits of quantization constants per weight (QLoRA paper, double quantization).
QLORA_FROZEN_BYTES_PER_PARAM = 0.5 + 0.127 / 8
# DeepSpeed's estimators multiply host memory by this safety factor (their `additional_buffer_factor`).
HOST_BUFFER_FACTOR = 1.5
ADAM_STATE_BYTES = 8      # fp32 momentum + variance per trainable parameter
FP32_BYTES = 4
# Elements of one chunk's logits in the chunked loss (train/chunked_loss.py); set here so the plan counts what
# training allocates. With fp32 logits, their softmax and the model-dtype logits a chunk holds ~3 such buffers:
# 2**26 elements is ~0.8 GB at peak, 441 tokens per chunk at Qwen2.5's vocabulary of 152,064.
LOSS_CHUNK_ELEMENTS = 2 ** 26


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss at this vocabulary size."""
    return max(1, LOSS_CHUNK_ELEMENTS // max(1, vocab_size))


def uses_chunked_loss(setting: Union[Literal["auto"], bool], device_type: str) -> bool:
    """`train.chunked_loss` for ranks on this device type (a model whose logits it cannot reproduce still
    falls back to the plain loss when built). auto follows benchmarks/loss_memory.py (benchmarks/RESULTS.md,
    "Chunked cross-entropy"): on CPU the chunked loss measured at least as fast as the plain one; it has not
    been measured on a GPU here, so there auto keeps the plain loss."""
    return setting is True or (setting == "auto" and device_type == "cpu")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its config on the meta device."""
    total_params: int
    trainable_params: int
    largest_layer_params: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_hidden_size: int          # hidden size of k (and of v) with grouped-query attention
    intermediate_size: int
    vocab_size: int
    frozen_bytes_per_param: Optional[float] = None   # QLoRA: frozen weights stored in 4 bits


@dataclass(frozen=True, kw_only=True)
class ModelStateBytes:
    """Bytes of model states on one rank's device, and on one host's CPU, for one ZeRO setting."""
    stage: int
    offload: Offload
    params: int              # working weights (16-bit, or fp32 on CPU ranks)
    gradients: int
    master_params: int       # fp32 weights the optimizer updates (mixed precision, and ZeRO-1/2 partitions)
    optimizer_states: int    # Adam momentum + variance
    largest_layer: int       # ZeRO-3: one gathered layer at a time
    host_bytes: int          # per host, DeepSpeed's estimate including its 1.5x buffer factor

    @property
    def device_bytes(self) -> int:
        return self.params + self.gradients + self.master_params + self.optimizer_states + self.largest_layer


def is_valid_zero_setting(stage: int, offload: Offload) -> bool:
    """Offloading the optimizer needs ZeRO >= 1; offloading parameters needs ZeRO-3."""
    return (offload == "none" or stage >= 1) and (offload != "optimizer+params" or stage == 3)


def _linear_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list[nn.Linear]:
    """The Linear layers LoRA wraps, by peft's rules: a name matches when it equals or ends with `.target`;
    `all-linear` takes every Linear except the output head."""
    from torch import nn

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules):
            chosen.append(module)
    return chosen


def count_lora_params(model: nn.Module, *, rank: int, target_modules: Union[str, Sequence[str]]) -> int:
    """Trainable LoRA parameters: A (r x in) and B (out x r) for each targeted Linear."""
    return sum(rank * (m.in_features + m.out_features) for m in _linear_targets(model, target_modules))


def largest_layer_params(model: nn.Module) -> int:
    """The biggest parameter count held directly by one module, as DeepSpeed's `model_to_params` counts it."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def model_shape_from_config(config, *, method: str = "full", lora_rank: int = 16,
                            lora_targets: Union[str, Sequence[str]] = "all-linear") -> ModelShape:
    """Build the model on the meta device (no weights, no memory) and count what the estimate needs."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() already counts tied weights once
    trainable = total if method == "full" else count_lora_params(model, rank=lora_rank, target_modules=lora_targets)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(total_params=total + (trainable if method != "full" else 0), trainable_params=trainable,
                      largest_layer_params=largest_layer_params(model), hidden_size=text.hidden_size,
                      num_layers=text.num_hidden_layers, num_attention_heads=heads,
                      kv_hidden_size=kv_heads * head_dim,
                      intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      vocab_size=text.vocab_size,
                      frozen_bytes_per_param=QLORA_FROZEN_BYTES_PER_PARAM if method == "qlora" else None)


def _gradient_bytes(trainable: int, *, stage: int, world: int, precision: Precision) -> int:
    """Working gradients (16-bit, or fp32 on CPU ranks) plus the fp32 gradient partition the optimizer reads.

    ZeRO-3 counts only the fp32 partition, as DeepSpeed's ZeRO-3 estimator does (16-bit gradients there
    live in reduce buckets, not per parameter)."""
    working = FP32_BYTES if precision == "fp32" else 2
    fp32_partition = FP32_BYTES * trainable / world
    if stage == 0:
        return int(working * trainable + (0 if precision == "fp32" else FP32_BYTES * trainable))
    if stage == 1:
        return int(working * trainable + fp32_partition)
    if stage == 2:
        return int(working * trainable / world + fp32_partition)
    return int(fp32_partition)


def estimate_model_state_bytes(shape: ModelShape, *, stage: int, offload: Offload, nodes: int,
                               ranks_per_node: int, precision: Precision = "bf16",
                               frozen_bytes_per_param: float | None = None,
                               world_size: int | None = None) -> ModelStateBytes:
    """Model-state bytes per rank (device) and per host (CPU) for one ZeRO stage and offload setting.

    Mixed precision (bf16/fp16), as DeepSpeed's estimators assume: 16-bit weights, gradients (see
    `_gradient_bytes`), fp32 master weights and fp32 Adam states; 2 + 18/N bytes per parameter at ZeRO-2,
    18/N at ZeRO-3. fp32 (CPU ranks): the model's own fp32 weights are the working copy; ZeRO-1/2/3 still
    keep a cloned fp32 partition for the optimizer. Only trainable parameters (LoRA) get gradients and
    optimizer states. Frozen weights are `frozen_bytes_per_param` wide when given, else the shape's (QLoRA),
    else as wide as the working weights. `world_size` defaults to nodes x ranks_per_node; hosts with
    different rank counts pass their sum (ranks_per_node is then the most on one host).
    """
    if not is_valid_zero_setting(stage, offload):
        raise ValueError(f"ZeRO-{stage} cannot offload {offload}")
    world = world_size or nodes * ranks_per_node
    total, trainable = shape.total_params, shape.trainable_params
    weight = FP32_BYTES if precision == "fp32" else 2
    frozen_width = next((w for w in (frozen_bytes_per_param, shape.frozen_bytes_per_param) if w is not None), weight)
    params = int(trainable * weight + (total - trainable) * frozen_width)
    if stage == 3:
        params = 0 if offload == "optimizer+params" else int(params / world)
    state_share = 1 if stage == 0 else world
    master = 0 if (precision == "fp32" and stage == 0) else int(FP32_BYTES * trainable / state_share)
    gradients = _gradient_bytes(trainable, stage=stage, world=world, precision=precision)
    optimizer = int(ADAM_STATE_BYTES * trainable / state_share)
    if offload != "none":  # gradients stream to host buckets; master weights and Adam states live there
        gradients, master, optimizer = 0, 0, 0
    return ModelStateBytes(stage=stage, offload=offload, params=params, gradients=gradients, master_params=master,
                           optimizer_states=optimizer,
                           largest_layer=FP32_BYTES * shape.largest_layer_params if stage == 3 else 0,
                           host_bytes=_host_bytes(shape, stage=stage, offload=offload, nodes=nodes,
                                                  ranks_per_node=ranks_per_node, world=world))


def _host_bytes(shape: ModelShape, *, stage: int, offload: Offload, nodes: int, ranks_per_node: int,
                world: int) -> int:
    """Host (CPU) memory per node, as DeepSpeed estimates it: every rank loads an fp32 copy of the model
    (ZeRO-3 with zero.Init only one layer at a time), and offloaded states live in host memory."""
    total = shape.total_params
    optimizer_bytes = (2 * FP32_BYTES + ADAM_STATE_BYTES) * shape.trainable_params  # fp32 grads, master, Adam
    if stage == 3:
        if offload == "none":
            raw = FP32_BYTES * shape.largest_layer_params * ranks_per_node
        else:
            offloaded_params = 2 * total if offload == "optimizer+params" else 0
            raw = (optimizer_bytes + offloaded_params) / nodes
    elif offload == "optimizer":
        raw = max(FP32_BYTES * world * total, optimizer_bytes)
    else:
        raw = FP32_BYTES * total * ranks_per_node
    return int(raw * HOST_BUFFER_FACTOR)


@dataclass(frozen=True, kw_only=True)
class ActivationBytes:
    without_checkpointing: int
    with_checkpointing: int


def estimate_activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, precision: Precision,
                              eager_attention: bool = False, chunked_loss: bool = False) -> ActivationBytes:
    """Activations kept for backward on one rank (an estimate, not an oracle).

    Per layer and token of a pre-norm decoder with SwiGLU MLP, the saved tensors are: attention norm
    input and output, q, k, v, attention output (4h + 2kv); MLP norm input and output, gate, up, act(gate),
    gate*up (2h + 4i). Eager attention also keeps scores and probabilities (2 x heads x seq per token).
    Logits are kept in 16-bit plus an fp32 copy for the loss. The chunked loss instead holds one chunk of
    logits (16-bit, fp32 and its softmax), the fp32 gradient of the output weight it accumulates, and the
    gradient of the hidden states. With gradient checkpointing only each layer's input is kept, plus one
    layer's activations while it is recomputed.
    """
    width = FP32_BYTES if precision == "fp32" else 2
    tokens = micro_batch * seq_len
    per_token = 6 * shape.hidden_size + 2 * shape.kv_hidden_size + 4 * shape.intermediate_size
    if eager_attention:
        per_token += 2 * shape.num_attention_heads * seq_len
    layer = tokens * per_token * width
    logits = tokens * shape.vocab_size * (width + FP32_BYTES)
    if chunked_loss:
        chunk = min(tokens, loss_chunk_tokens(shape.vocab_size))
        logits = (chunk * shape.vocab_size * (width + 2 * FP32_BYTES)
                  + FP32_BYTES * shape.vocab_size * shape.hidden_size + tokens * shape.hidden_size * width)
    checkpoints = shape.num_layers * tokens * shape.hidden_size * width
    return ActivationBytes(without_checkpointing=shape.num_layers * layer + logits,
                           with_checkpointing=checkpoints + layer + logits)
