"""Load a saved model dir (full HF model or PEFT adapter) and greedy-generate chat answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deepfleet.errors import DeepfleetError, exception_summary
from deepfleet.train.chat_labels import adds_bos, generation_stop_ids

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What a missing, truncated or corrupt file in a model dir raises while it loads.
DAMAGED_FILE_ERRORS = (OSError, ValueError, EOFError, SafetensorError)


def load_for_generation(model_dir: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a full HF model dir or a LoRA adapter dir."""
    path = Path(model_dir).expanduser()
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if (path / ADAPTER_CONFIG).is_file():
            model = _load_adapter_model(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype_for_device())
    except DAMAGED_FILE_ERRORS as exc:   # what the checks above cannot see
        raise _incomplete(path, f"loading it failed ({exception_summary(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(_placement()[0]).eval(), tokenizer


def check_model_dir(path: Path) -> None:
    """Name a missing or unreadable file before transformers fails on it with a traceback."""
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()):
        raise DeepfleetError(f"{str(path)!r} is not a saved model dir (no config.json or adapter_config.json)",
                             where="MODEL_DIR", fix="pass a dir written by deepfleet train, e.g. runs/demo/final")
    _require_one_of(path, TOKENIZER_FILES, "tokenizer files")
    _require_one_of(path, ADAPTER_WEIGHTS if (path / ADAPTER_CONFIG).is_file() else FULL_WEIGHTS, "weights")
    for file in sorted(path.rglob("*.json")):
        _check_readable(path, file, lambda: json.loads(file.read_text()))
    for file in sorted(path.rglob("*.safetensors")):
        _check_readable(path, file, lambda: safe_open(file, framework="pt").keys())  # header and size only


def _require_one_of(path: Path, names: tuple[str, ...], what: str) -> None:
    if not any((path / name).is_file() for name in names):
        raise _incomplete(path, f"no {what} ({' or '.join(names)})")


def _check_readable(path: Path, file: Path, read) -> None:
    try:
        read()
    except DAMAGED_FILE_ERRORS as exc:
        raise _incomplete(path, f"{file.relative_to(path)} is unreadable ({exception_summary(exc)})") from None


def _incomplete(path: Path, detail: str) -> DeepfleetError:
    return DeepfleetError(f"the saved model is damaged or incomplete: {detail}", where=str(path),
                          fix="export it again (deepfleet export RUN_DIR --to DIR) or re-run training")


def generation_placement(*, cuda_devices: int, bf16_supported: bool) -> tuple[str, torch.dtype]:
    """Where `generate` runs: the first GPU when there is one (bf16, or fp16 on GPUs without bf16),
    else the CPU in fp32."""
    if cuda_devices:
        return "cuda:0", torch.bfloat16 if bf16_supported else torch.float16
    return "cpu", torch.float32


def _placement() -> tuple[str, torch.dtype]:
    available = torch.cuda.is_available()
    return generation_placement(cuda_devices=torch.cuda.device_count() if available else 0,
                                bf16_supported=available and torch.cuda.is_bf16_supported())


def _dtype_for_device() -> torch.dtype:
    return _placement()[1]


def _load_adapter_model(path: Path) -> torch.nn.Module:
    from peft import PeftModel
    base_name = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    local_base = path / base_name
    if base_name and local_base.is_dir():   # shipped with the adapter: damage there is damage here
        base = AutoModelForCausalLM.from_pretrained(str(local_base), dtype=_dtype_for_device())
    else:
        base = _load_external_base(base_name, path)
    return PeftModel.from_pretrained(base, str(path))


def _load_external_base(base_name: str, path: Path) -> torch.nn.Module:
    if not base_name:
        raise DeepfleetError("the adapter does not name its base model", where=str(path / ADAPTER_CONFIG),
                             fix="set base_model_name_or_path to the base model's Hub id or dir")
    try:
        return AutoModelForCausalLM.from_pretrained(base_name, dtype=_dtype_for_device())
    except OSError as exc:
        raise DeepfleetError(f"cannot load the adapter's base model {base_name!r}: {str(exc).splitlines()[0]}",
                             where=str(path / ADAPTER_CONFIG),
                             fix="make the base model reachable (Hub id, network, HF_TOKEN) or fix its path") from None


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The prompt as training saw it: the chat template with the generation prompt, and the bos the
    tokenizer uses when the template does not write it."""
    if not tokenizer.chat_template:
        prompt = "\n".join(message["content"] for message in messages)
    else:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if adds_bos(tokenizer) and not prompt.startswith(tokenizer.bos_token):
        prompt = tokenizer.bos_token + prompt
    return prompt


@torch.no_grad()
def generate_answers(model: torch.nn.Module | PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     conversations: list[list[dict]], *, max_new_tokens: int = 64,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers, one per conversation, decoded without the prompt and special tokens."""
    answers: list[str] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop_ids = generation_stop_ids(model, tokenizer)
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [chat_prompt(tokenizer, messages) for messages in conversations[start:start + batch_size]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {key: value.to(model.device) for key, value in encoded.items()}
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
    return answers
