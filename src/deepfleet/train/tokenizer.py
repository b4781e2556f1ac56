"""Tokenizer loading: the shipped character-level tokenizer for `builtin:tiny`, or any HF tokenizer."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import BUILTIN_MODEL_PREFIX, TINY_MODEL_NAME, ModelSpec

if TYPE_CHECKING:   # transformers takes seconds to import; the head checks prepared data without it
    from transformers import PreTrainedTokenizerBase


def tiny_tokenizer_dir() -> Path:
    """Where the shipped tokenizer files for `builtin:tiny` live inside the installed package."""
    return Path(str(resources.files("deepfleet") / "assets" / "tiny_tokenizer"))


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def _check_model_name(model: ModelSpec) -> None:
    if model.name.startswith(BUILTIN_MODEL_PREFIX) and model.name != TINY_MODEL_NAME:
        raise DeepfleetError(f"unknown built-in model {model.name!r}", where="model.name",
                             fix=f"use {TINY_MODEL_NAME}, an HF Hub id or a local model dir")
    path = Path(model.name).expanduser()
    if _looks_like_local_path(model.name) and not path.is_dir():
        raise DeepfleetError(f"model path {str(path)!r} does not exist or is not a directory",
                             where="model.name",
                             fix="point model.name at a local HF model dir (with config.json) or use a Hub id")


def local_tokenizer_dir(model: ModelSpec) -> Path | None:
    """The dir the tokenizer loads from when it is on this machine (None: a Hub id)."""
    if model.name == TINY_MODEL_NAME:
        return tiny_tokenizer_dir()
    path = Path(model.name).expanduser()
    return path if path.is_dir() else None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (eos, else unk) when it has none; padding is always label-masked."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DeepfleetError("tokenizer has no pad, eos or unk token", where="model.name",
                                 fix="use a tokenizer that defines an eos token")
        tokenizer.pad_token = fallback
    return tokenizer


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer for `model`, with a pad token.

    `builtin:tiny` loads the character-level tokenizer shipped in `deepfleet/assets/tiny_tokenizer`
    (ChatML chat template, `<|pad|>` and `<|im_end|>` as eos). Anything else goes through
    `AutoTokenizer.from_pretrained` (a local dir or a Hub id). A missing local path is a `DeepfleetError`.
    """
    from transformers import AutoTokenizer

    _check_model_name(model)
    if model.name == TINY_MODEL_NAME:
        return ensure_pad_token(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir())))
    name = str(Path(model.name).expanduser()) if Path(model.name).expanduser().is_dir() else model.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DeepfleetError(f"cannot load the tokenizer of {model.name!r}: {exc}".splitlines()[0],
                             where="model.name",
                             fix="check the Hub id / local dir, network access and HF_TOKEN for gated models") from None
    return ensure_pad_token(tokenizer)
