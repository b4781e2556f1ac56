"""Causal-LM cross-entropy over the output layer in chunks of tokens, never holding [tokens x vocab] logits.

It equals transformers' `ForCausalLMLoss` on `lm_head(hidden)` (labels shifted left by one, -100
ignored, mean over the remaining targets; NaN when there are none, as there) with the optional final
logit soft-capping of Gemma 2/3 applied the way their forward applies it (in the model's dtype,
before the fp32 upcast; fp64 stays fp64). Per chunk the forward computes the logits, the loss, and already the
gradients of the hidden states, weight and bias (as Liger's fused linear cross-entropy does), so the
backward only scales them by the incoming gradient: three matmuls per chunk, like the plain path, and
one chunk's logits alive at a time. The weight gradient is accumulated in fp32 across chunks.

torchtune's `CEWithChunkedOutputLoss` still materialises every chunk's logits for backward, Liger's
kernel is Triton (GPU only) and cut-cross-entropy too; this runs the same on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepfleet.plan.memory import loss_chunk_tokens

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF's shift: position t predicts labels[t + 1]; the last position of every row predicts nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


# Eager under torch.compile (train/compiled_model.py): a Python loop over chunks, gradients formed in the forward.
@torch.compiler.disable
def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           bias: torch.Tensor | None = None, softcap: float | None = None,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """The mean causal-LM loss of `hidden` [..., H] through the output layer (`weight` [V, H], `bias` [V]),
    for `labels` [...] with HF's shift, computed `chunk_tokens` tokens at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = shifted_targets(labels.to(hidden.device))
    chunk = chunk_tokens or loss_chunk_tokens(weight.shape[0])
    # Inside the Function grad mode is always off and needs_input_grad ignores it: pass it on.
    return _LinearCrossEntropy.apply(flat, weight, bias, targets, softcap, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, grad_enabled):
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        n_targets = (targets != IGNORE_INDEX).sum()
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)     # fp32 as HF's upcast; fp64 kept
        scale = 1.0 / n_targets.to(loss_dtype)     # inf with no targets: the loss is NaN, as F.cross_entropy's mean
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=loss_dtype, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias)
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            logits = logits.to(loss_dtype)
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad = logits.sub_(lse[:, None]).exp_()   # softmax, in place of the fp32 logits
            grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
            grad.mul_(torch.where(valid, scale, 0.0)[:, None])
            if capped is not None:
                grad.mul_(1.0 - capped.to(loss_dtype).square())
            grad = grad.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:start + chunk] = grad @ weight
            if need_weight and grad_weight.dtype == h.dtype:
                grad_weight.addmm_(grad.t(), h)
            elif need_weight:
                grad_weight.add_(grad.t() @ h)
            if need_bias:
                grad_bias.add_(grad.sum(0))
        # Kept on ctx, not saved tensors: backward scales them in place and hands them over (no second copy of
        # the [vocab x hidden] weight gradient), so a second backward through the same loss is refused.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss was already backpropagated once; compute it again")
        grads, ctx.grads = ctx.grads, None
        return (*(None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype)
                  for grad, dtype in zip(grads, ctx.dtypes)), None, None, None, None)
