"""Load a saved model dir (full HF model or PEFT adapter) and greedy-generate chat answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deepfleet.errors import DeepfleetError

ADAPTER_CONFIG = "adapter_config.json"


def load_for_generation(model_dir: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a full HF model dir or a LoRA adapter dir."""
    path = Path(model_dir).expanduser()
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()):
        raise DeepfleetError(f"{str(path)!r} is not a saved model dir (no config.json or adapter_config.json)",
                             where="MODEL_DIR", fix="pass a dir written by deepfleet train, e.g. runs/demo/final")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (path / ADAPTER_CONFIG).is_file():
        model = _load_adapter_model(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype_for_device())
    return model.eval(), tokenizer


def _dtype_for_device() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _load_adapter_model(path: Path) -> torch.nn.Module:
    from peft import PeftModel
    base_name = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    local_base = path / base_name
    base_ref = str(local_base) if base_name and local_base.is_dir() else base_name
    if not base_ref:
        raise DeepfleetError("the adapter does not name its base model", where=str(path / ADAPTER_CONFIG),
                             fix="set base_model_name_or_path to the base model's Hub id or dir")
    try:
        base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=_dtype_for_device())
    except OSError as exc:
        raise DeepfleetError(f"cannot load the adapter's base model {base_ref!r}: {str(exc).splitlines()[0]}",
                             where=str(path / ADAPTER_CONFIG),
                             fix="make the base model reachable (Hub id, network, HF_TOKEN) or fix its path") from None
    return PeftModel.from_pretrained(base, str(path))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    if not tokenizer.chat_template:
        return "\n".join(message["content"] for message in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model: torch.nn.Module | PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     conversations: list[list[dict]], *, max_new_tokens: int = 64,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers, one per conversation, decoded without the prompt and special tokens."""
    answers: list[str] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [chat_prompt(tokenizer, messages) for messages in conversations[start:start + batch_size]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {key: value.to(model.device) for key, value in encoded.items()}
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
    return answers
