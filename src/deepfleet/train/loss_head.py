"""The training loss of a causal LM: the model's own (plain), or chunked cross-entropy through its output layer.

The chunked loss runs *inside* the output layer's call: for one forward, the layer's `forward` is
replaced by `chunked_causal_lm_loss` on the hidden states it receives, and the model gets no labels.
So the model's forward runs unchanged up to its output layer, the layer returns the loss where the
logits would be, and every DeepSpeed hook of the layer still fires: under ZeRO-3 its partitioned
weight is gathered for that call, and again for the backward through it. Post-processing that the
model applies to the logits after the layer either is applied inside the chunked loss and turned
off for that forward (Gemma 2/3's final soft-capping) or makes the choice fall back to the plain
loss, with the reason in the startup line. MoE models add their router loss to the loss only when
given labels, so it is added here the same way: loss + router_aux_loss_coef x aux_loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Union

import torch

from deepfleet.plan.memory import loss_chunk_tokens, uses_chunked_loss
from deepfleet.train.chunked_loss import chunked_causal_lm_loss

ChunkedLossSetting = Union[Literal["auto"], bool]
# Config keys of transformers models that scale the logits after the output layer (Cohere, Granite);
# none of deepfleet's families has them, but a config that carries one is not trained through the chunked loss.
LOGIT_SCALES = ("logit_scale", "logits_scaling")


@dataclass(frozen=True, kw_only=True)
class LossChoice:
    chunked: bool
    why_plain: str = ""                 # set when chunked is False
    softcap: float | None = None        # final logit soft-capping the chunked loss applies
    chunk_tokens: int = 0

    def describe(self) -> str:
        if self.chunked:
            cap = f", soft-capped at {self.softcap:g}" if self.softcap else ""
            return f"chunked cross-entropy ({self.chunk_tokens} tokens per chunk{cap})"
        return f"plain cross-entropy ({self.why_plain})"


@dataclass(frozen=True, kw_only=True)
class LossOutput:
    loss: torch.Tensor
    aux_loss: torch.Tensor | None = None    # MoE router load-balancing loss (already in `loss`, times its coefficient)


def choose_loss(model: torch.nn.Module, *, requested: ChunkedLossSetting, device_type: str) -> LossChoice:
    """Chunked when asked (or, with `auto`, where it was measured at least as fast) and when this model's
    logits are exactly its output layer's (plus soft-capping); otherwise plain, saying why."""
    if requested is False:
        return LossChoice(chunked=False, why_plain="train.chunked_loss: false")
    if not uses_chunked_loss(requested, device_type):
        return LossChoice(chunked=False, why_plain=f"train.chunked_loss: auto is on only where measured "
                                                   f"at least as fast, not yet on {device_type}")
    reason = _why_not_chunked(model)
    if reason:
        return LossChoice(chunked=False, why_plain=f"chunked loss not used: {reason}")
    head = model.get_output_embeddings()
    text = _text_config(model)
    return LossChoice(chunked=True, softcap=getattr(text, "final_logit_softcapping", None),
                      chunk_tokens=loss_chunk_tokens(head.out_features))


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _why_not_chunked(model: torch.nn.Module) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "the model names no output layer (get_output_embeddings)"
    if type(head) is not torch.nn.Linear:
        kind = type(head)
        return (f"its output layer is a {kind.__module__}.{kind.__qualname__} (LoRA-wrapped or quantized?), "
                "not a torch.nn.Linear whose weight and bias alone make the logits")
    if head.weight.dtype == torch.float16:
        return ("fp16: it forms the gradients in the forward, before DeepSpeed's loss scale, where small ones "
                "would underflow")
    text = _text_config(model)
    scaled = [key for key in LOGIT_SCALES if getattr(text, key, None) not in (None, 1, 1.0)]
    if scaled:
        return f"its config scales the logits after the output layer ({', '.join(scaled)})"
    return ""


def model_loss(call: Callable[..., Any], model: torch.nn.Module, choice: LossChoice,
               tensors: dict[str, torch.Tensor], **kwargs: Any) -> LossOutput:
    """`call(**tensors, **kwargs)` (the engine, or the model) and its loss, plain or chunked by `choice`.

    `tensors` holds `labels` (-100 where ignored); `model` is what `call` runs, to reach its output layer."""
    if not choice.chunked:
        output = call(**tensors, **kwargs)
        return LossOutput(loss=output.loss, aux_loss=getattr(output, "aux_loss", None))
    inputs = {key: value for key, value in tensors.items() if key != "labels"}
    with _loss_in_output_layer(model, choice, tensors["labels"]):
        output = call(**inputs, **kwargs)
    loss = output.logits        # what the output layer returned
    aux_loss = getattr(output, "aux_loss", None)
    if aux_loss is not None:    # as the MoE forward does when it is given labels
        loss = loss + _text_config(model).router_aux_loss_coef * aux_loss.to(loss.device)
    return LossOutput(loss=loss, aux_loss=aux_loss)


@contextlib.contextmanager
def _loss_in_output_layer(model: torch.nn.Module, choice: LossChoice, labels: torch.Tensor) -> Iterator[None]:
    head = model.get_output_embeddings()
    text = _text_config(model)

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        return chunked_causal_lm_loss(hidden, head.weight, labels, bias=head.bias, softcap=choice.softcap,
                                      chunk_tokens=choice.chunk_tokens)

    head.forward = loss_forward
    if choice.softcap is not None:
        text.final_logit_softcapping = None     # applied inside the loss; the forward must not cap the loss itself
    try:
        yield
    finally:
        del head.forward
        if choice.softcap is not None:
            text.final_logit_softcapping = choice.softcap
