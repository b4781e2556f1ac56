"""The chunked cross-entropy equals transformers' causal-LM loss on the full logits: loss and gradients."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.loss.loss_utils import ForCausalLMLoss

from deepfleet.plan.memory import loss_chunk_tokens
from deepfleet.train.chunked_loss import IGNORE_INDEX, chunked_causal_lm_loss

VOCAB, HIDDEN = 37, 12


def plain_loss(hidden, weight, labels, *, bias=None, softcap=None):
    """What an HF causal LM computes: logits from the output layer, soft-capped in the model dtype, then
    ForCausalLMLoss (shift by one, -100 ignored, mean; it computes in fp32, so fp64 goes through exact_loss)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if logits.dtype == torch.float64:
        return exact_loss(logits, labels)
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0])


def exact_loss(logits, labels):
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def inputs(dtype, *, rows=3, length=11, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, HIDDEN, generator=generator, dtype=dtype) * 2
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=dtype)
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels[0, :4] = IGNORE_INDEX              # an answer-only prompt
    labels[1, 5] = IGNORE_INDEX               # a packed sequence boundary
    labels[2, :] = IGNORE_INDEX               # a row with nothing to predict: whole chunks ignored
    tensors = [hidden, weight] + ([torch.randn(VOCAB, generator=generator, dtype=dtype)] if bias else [])
    return [t.requires_grad_() for t in tensors], labels


def loss_and_grads(fn, tensors, labels, **kwargs):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    hidden, weight, *rest = tensors
    loss = fn(hidden, weight, labels, bias=rest[0] if rest else None, **kwargs)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("chunk", [1, 4, 11, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_float64_equals_the_plain_loss_and_gradients(chunk, softcap, bias):
    tensors, labels = inputs(torch.float64, bias=bias)
    expected, expected_grads = loss_and_grads(plain_loss, tensors, labels, softcap=softcap)
    got, grads = loss_and_grads(chunked_causal_lm_loss, tensors, labels, softcap=softcap, chunk_tokens=chunk)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_float32_within_1e_5(softcap):
    tensors, labels = inputs(torch.float32, rows=4, length=64, seed=1)
    expected, expected_grads = loss_and_grads(plain_loss, tensors, labels, softcap=softcap)
    got, grads = loss_and_grads(chunked_causal_lm_loss, tensors, labels, softcap=softcap, chunk_tokens=7)
    assert abs(got.item() - expected.item()) <= 1e-5
    for grad, want in zip(grads, expected_grads):
        assert (grad - want).abs().max().item() <= 1e-5


def test_bfloat16_close_to_the_plain_loss():
    tensors, labels = inputs(torch.bfloat16, length=32, seed=2)
    expected, expected_grads = loss_and_grads(plain_loss, tensors, labels, softcap=30.0)
    got, grads = loss_and_grads(chunked_causal_lm_loss, tensors, labels, softcap=30.0, chunk_tokens=5)
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) <= 1e-3 * expected.item()
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_the_incoming_gradient_scales_every_gradient():
    tensors, labels = inputs(torch.float64, bias=True)
    scaled = lambda *args, **kwargs: 0.25 * chunked_causal_lm_loss(*args, chunk_tokens=3, **kwargs)  # noqa: E731
    plain = lambda *args, **kwargs: 0.25 * plain_loss(*args, **kwargs)  # noqa: E731
    _, grads = loss_and_grads(scaled, tensors, labels)
    _, expected = loss_and_grads(plain, tensors, labels)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want)


def test_no_targets_gives_nan_like_the_plain_loss():
    tensors, labels = inputs(torch.float64)
    labels[:] = IGNORE_INDEX
    assert math.isnan(plain_loss(*tensors, labels).item())
    assert math.isnan(chunked_causal_lm_loss(*tensors, labels, chunk_tokens=4).item())


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    (hidden, weight), labels = inputs(torch.float64)
    weight.requires_grad_(False)
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        again = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())
    assert counter.get_total_flops() == 2 * hidden.shape[0] * hidden.shape[1] * HIDDEN * VOCAB   # logits only


def test_chunk_size_follows_the_vocabulary():
    assert loss_chunk_tokens(152_064) == 441        # Qwen2.5: 441 x 152,064 logits per chunk
    assert loss_chunk_tokens(32_000) == 2097
    assert loss_chunk_tokens(10 ** 9) == 1


def test_a_second_backward_is_refused():
    (hidden, weight), labels = inputs(torch.float64)
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
