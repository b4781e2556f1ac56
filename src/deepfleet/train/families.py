"""The model families deepfleet trains, and the attention each uses for packed rows on CPU and GPU.

A family is a transformers `model_type`. Each entry here is proven by `tests/families/`: packed
sequences keep apart (logits equal to each sequence alone), the default attention loads, answer-only
labels under the family's chat template, two-rank ZeRO-3 and LoRA training, export and generate.
Anything else is refused in one line rather than trained without that proof.

How packed rows (several sequences in one row, position_ids restarting at 0) keep sequences apart:
- "position_ids": the model's own mask code reads the restarting position_ids (transformers'
  packed-sequence detection), and its attention functions receive them.
- "block_mask": the model builds its mask from the attention mask alone (OPT takes positions from
  position_ids but not its mask), so deepfleet passes a 4D block-diagonal causal mask itself.
- "refused": neither works (BLOOM: ALiBi and its mask come from a 2D attention mask only, and it
  takes no 4D mask), so packing is refused with `data.packing: false` as the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deepfleet.errors import DeepfleetError

PackingMode = Literal["position_ids", "block_mask", "refused"]
PER_SEQUENCE = "deepfleet_per_sequence"   # registered by train/packed_attention.py


@dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str
    label: str                          # how users name it
    packing: PackingMode
    per_sequence: bool = True           # the model hands position_ids to its attention function (so
                                        # deepfleet's per-sequence kernel and flash-attn varlen see the sequences)
    sdpa: bool = True                   # transformers has an sdpa path for it
    flash: bool = True                  # flash_attention_2 with varlen from position_ids
    moe_block: str | None = None        # the sparse MoE block class, a ZeRO-3 leaf module
    refusal: str = ""                   # why packing is refused

    @property
    def is_moe(self) -> bool:
        return self.moe_block is not None


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family(model_type="llama", label="Llama 2/3.x", packing="position_ids"),
    Family(model_type="mistral", label="Mistral", packing="position_ids"),
    Family(model_type="mixtral", label="Mixtral (MoE)", packing="position_ids", moe_block="MixtralSparseMoeBlock"),
    Family(model_type="qwen2", label="Qwen2/2.5", packing="position_ids"),
    Family(model_type="qwen2_moe", label="Qwen2-MoE", packing="position_ids", moe_block="Qwen2MoeSparseMoeBlock"),
    Family(model_type="qwen3", label="Qwen3", packing="position_ids"),
    Family(model_type="qwen3_moe", label="Qwen3-MoE", packing="position_ids", moe_block="Qwen3MoeSparseMoeBlock"),
    Family(model_type="gemma", label="Gemma", packing="position_ids"),
    # Logit soft-capping: no sdpa in transformers; the per-sequence kernel and eager apply it.
    Family(model_type="gemma2", label="Gemma 2", packing="position_ids", sdpa=False),
    Family(model_type="gemma3_text", label="Gemma 3 (text)", packing="position_ids"),
    Family(model_type="phi3", label="Phi-3/3.5/4", packing="position_ids"),
    # Falcon picks its attention class from a fixed table (no custom kernels); its sdpa and eager
    # paths read packed rows from position_ids. Its flash class is not verified for packed rows.
    Family(model_type="falcon", label="Falcon", packing="position_ids", per_sequence=False, flash=False),
    Family(model_type="opt", label="OPT", packing="block_mask"),
    Family(model_type="bloom", label="BLOOM", packing="refused", per_sequence=False, sdpa=False, flash=False,
           refusal="its ALiBi biases and causal mask come from a 2D attention mask, so packed sequences "
                   "would attend to each other"),
    Family(model_type="gpt_neox", label="GPT-NeoX / Pythia", packing="position_ids"),
    Family(model_type="gpt2", label="GPT-2", packing="position_ids"),
)}


def supported_list() -> str:
    return ", ".join(FAMILIES)


def family_of(config: Any, *, model_name: str, trust_remote_code: bool) -> Family:
    """The family of an HF config, or a one-line DeepfleetError for code or architectures not proven here."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise remote_code_refusal(model_name)
    family = FAMILIES.get(model_type)
    if family is None:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise DeepfleetError(f"model type {model_type!r} ({architectures}) is not a family deepfleet has proven "
                             "it trains correctly", where="model.name",
                             fix=f"use a model of a supported family: {supported_list()}")
    return family


def remote_code_refusal(model_name: str) -> DeepfleetError:
    return DeepfleetError(f"model {model_name!r} ships its own modeling code (auto_map in config.json), "
                          "which runs only with model.trust_remote_code: true", where="model.trust_remote_code",
                          fix="set model.trust_remote_code: true if you trust that code (it runs on every host)")


def check_packing(family: Family, *, packing: bool) -> None:
    if packing and family.packing == "refused":
        raise DeepfleetError(f"{family.label} cannot keep packed sequences apart: {family.refusal}",
                             where="data.packing", fix="set data.packing: false for this model")


@dataclass(frozen=True, kw_only=True)
class AttentionChoice:
    implementation: str                 # attn_implementation the model is loaded with
    block_mask: Literal["bool", "additive"] | None = None   # deepfleet passes a 4D mask of this kind
    flatten_rows: bool = False          # a micro batch goes in as one row (flash-attn varlen needs batch 1)

    def describe(self) -> str:
        name = "per-sequence (deepfleet)" if self.implementation == PER_SEQUENCE else self.implementation
        if self.block_mask:
            name += " + block mask"
        return name + (" (rows flattened)" if self.flatten_rows else "")


def _default_implementation(family: Family, *, device_type: str, packed_rows: bool, flash_available: bool) -> str:
    if not packed_rows:
        return "sdpa" if family.sdpa else "eager"
    if device_type == "cpu" and family.per_sequence:
        return PER_SEQUENCE     # measured faster than sdpa's block mask on CPU; a Python loop, so never on GPU
    if device_type != "cpu" and flash_available and family.flash:
        return "flash_attention_2"
    return "sdpa" if family.sdpa else "eager"


def choose_attention(family: Family, *, requested: str, device_type: str, packed_rows: bool,
                     flash_available: bool) -> AttentionChoice:
    """The attention a model is loaded with, and what packed rows need with it to keep sequences apart."""
    if requested == "auto":
        implementation = _default_implementation(family, device_type=device_type, packed_rows=packed_rows,
                                                 flash_available=flash_available)
    else:
        implementation = requested
        supported = {"sdpa": family.sdpa, "flash_attention_2": family.flash or not packed_rows, "eager": True}
        if not supported[requested]:
            raise DeepfleetError(f"{family.label} has no verified {requested} attention"
                                 + (" for packed rows" if packed_rows else ""),
                                 where="model.attn_implementation", fix="use attn_implementation: auto")
        if requested == "flash_attention_2" and not flash_available:
            raise DeepfleetError("attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package",
                                 where="model.attn_implementation", fix="use attn_implementation: auto")
    if not packed_rows or family.packing != "block_mask" or implementation in (PER_SEQUENCE, "flash_attention_2"):
        return AttentionChoice(implementation=implementation,
                               flatten_rows=packed_rows and implementation == "flash_attention_2")
    return AttentionChoice(implementation=implementation,
                           block_mask="bool" if implementation == "sdpa" else "additive")
