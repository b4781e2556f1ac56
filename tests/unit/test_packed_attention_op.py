"""The CPU per-sequence attention op: the eager loop's outputs and gradients, and no graph break when compiled."""

from __future__ import annotations

import pytest
import torch

from deepfleet.train.packed_attention import _per_sequence_loop, per_sequence_attention

LENGTHS = [[5, 17, 1, 9], [20, 12]]     # two rows of 32 positions, a one-token sequence among them


def packed_inputs(heads: int, kv_heads: int, dim: int = 8, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    positions = torch.tensor([[p for n in row for p in range(n)] for row in LENGTHS])
    # [batch, heads, seq, dim] views of [batch, seq, heads, dim], as the families' attention modules pass them
    tensors = [torch.randn(len(LENGTHS), 32, h, dim, dtype=dtype).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads)]
    return (*tensors, positions)


@pytest.mark.parametrize("heads,kv_heads,window,dtype", [(4, 4, None, torch.float32), (4, 2, None, torch.float32),
                                                        (4, 1, 6, torch.float32), (4, 2, None, torch.bfloat16)])
def test_op_gives_the_eager_loops_outputs_and_gradients(heads, kv_heads, window, dtype):
    query, key, value, positions = packed_inputs(heads, kv_heads, dtype=dtype)
    module = torch.nn.Module().train()
    out = per_sequence_attention(module, query, key, value, None, position_ids=positions, sliding_window=window)[0]
    loop = _per_sequence_loop(query, key, value, positions, scaling=None, dropout_p=0.0, window=window, softcap=None)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    loop_grads = torch.autograd.grad(loop, (query, key, value), grad)
    assert out.shape == (2, 32, heads, 8) and out.dtype == dtype
    assert (out - loop).abs().max().item() == 0
    for mine, theirs in zip(grads, loop_grads):
        assert mine.shape == theirs.shape and theirs.abs().max() > 0
        assert (mine - theirs).abs().max().item() == 0    # bf16: only with the kernel's float32 logsumexp


def test_op_compiles_into_one_graph_with_the_eager_results():
    query, key, value, positions = packed_inputs(4, 2)
    module = torch.nn.Module().train()

    def attention_sum(q, k, v, p):
        return per_sequence_attention(module, q * 2, k, v, None, position_ids=p)[0].square().sum()

    compiled = torch.compile(attention_sum, fullgraph=True, dynamic=True)   # fullgraph: a graph break is an error
    eager_loss = attention_sum(query, key, value, positions)
    eager_grads = torch.autograd.grad(eager_loss, (query, key, value))
    compiled_loss = compiled(query, key, value, positions)
    compiled_grads = torch.autograd.grad(compiled_loss, (query, key, value))
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-4
    for mine, theirs in zip(compiled_grads, eager_grads):
        assert (mine - theirs).abs().max().item() < 1e-5
