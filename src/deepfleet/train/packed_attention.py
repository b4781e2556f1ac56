"""Attention for packed training rows: per-sequence causal attention, and block-diagonal masks.

With packing, transformers turns the restarting position_ids into a block-diagonal mask, and the CPU
sdpa kernel then computes every full row x row block, although a sequence of length L needs only its
own causal L x L block. Running attention per sequence gives the same logits and is faster on
forward+backward by 1.06x at rows of 512 and 1.65x at 2048 (benchmarks/packed_attention.py): the
masked kernel's waste grows with the square of the row length. It also keeps sequences apart in
families whose own mask ignores position_ids (OPT), and applies sliding windows and logit
soft-capping (Mistral, Gemma 2/3) inside each sequence.

It is only chosen for packed training rows, which carry no padding mask (`batches.collate`), so no
mask function is registered and transformers builds none. The registered name must not contain
"sdpa": transformers would then refuse it for families without sdpa support (Gemma 2).

`block_causal_mask` is the 4D mask deepfleet passes itself where a family's sdpa/eager path does
not read packed sequences from position_ids (see `families.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from deepfleet.train.families import PER_SEQUENCE


def sequence_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sequence in one row; a new one starts wherever the position does not
    go up by one, the rule transformers uses to detect packed rows."""
    starts = [0] + ((position_ids[1:] - position_ids[:-1]) != 1).nonzero().flatten().add(1).tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[-1]]))


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> the index of the packed sequence each token belongs to, per row."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[batch, 1, seq, seq]: a token sees the earlier tokens of its own sequence only. Boolean (True:
    attend) for sdpa, or additive (0 / dtype min) for eager attention when `dtype` is given."""
    ids = sequence_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (ids[:, :, None] == ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask where query i sees keys j with i - window < j <= i (transformers' sliding window)."""
    index = torch.arange(length, device=device)
    distance = index[:, None] - index[None, :]
    return (distance >= 0) & (distance < window)


def _one_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float | None,
                  dropout_p: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """Causal attention of one sequence: query [1, heads, L, dim], key/value [1, kv_heads, L, dim]."""
    length = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    mask = _window_mask(length, window, query.device) if window and length > window else None
    if not softcap:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                              scale=scaling, dropout_p=dropout_p, enable_gqa=gqa)
    if gqa:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    allowed = mask if mask is not None else torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(weights, value)


# Eager under torch.compile (train/compiled_model.py): its loop over each row's sequences would specialise the graph
# on every row's sequence boundaries.
@torch.compiler.disable
def per_sequence_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [batch, heads, seq, dim], key/value [batch, kv_heads, seq, dim] -> [batch, seq, heads, dim]."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        if kwargs.get("softcap"):
            raise ValueError("deepfleet's per-sequence attention got a mask or a KV cache with logit soft-capping; "
                             "load the model with attn_implementation='eager' for this")
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("deepfleet's per-sequence attention does not implement attention sinks")
    positions = position_ids.expand(query.shape[0], -1)
    dropout_p = dropout if module.training else 0.0
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    # unbind/split and cat, not slices: the backward of a slice (and of a write into a slice) fills a zero tensor
    # the size of the whole input for every sequence, which cost more than the attention itself (RESULTS.md).
    rows = []
    for row_positions, row_query, row_key, row_value in zip(positions, query.unbind(0), key.unbind(0), value.unbind(0)):
        lengths = [end - start for start, end in sequence_bounds(row_positions)]
        pieces = zip(row_query.split(lengths, dim=1), row_key.split(lengths, dim=1), row_value.split(lengths, dim=1))
        rows.append(torch.cat([
            _one_sequence(q[None], k[None], v[None], scaling=scaling, dropout_p=dropout_p, window=window,
                          softcap=softcap)[0].transpose(0, 1)
            for q, k, v in pieces], dim=0))
    return torch.stack(rows), None


AttentionInterface.register(PER_SEQUENCE, per_sequence_attention)


def model_inputs(tensors: dict[str, torch.Tensor], *, block_mask: str | None, flatten_rows: bool,
                 mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A packed micro batch as the chosen attention needs it (see `families.AttentionChoice`).

    Flattening is exact: every row starts a new sequence (position 0) and the first label of each
    sequence is ignored, so no token is predicted across a row boundary.
    """
    if flatten_rows and "attention_mask" not in tensors:
        tensors = {key: value.reshape(1, -1) for key, value in tensors.items()}
    if block_mask and "attention_mask" not in tensors:
        tensors = {**tensors, "attention_mask": block_causal_mask(
            tensors["position_ids"], dtype=mask_dtype if block_mask == "additive" else None)}
    return tensors
