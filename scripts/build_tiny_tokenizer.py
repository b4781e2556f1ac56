"""Build the character-level tokenizer that ships with deepfleet for the `builtin:tiny` model.

Run from the repo root:  .venv/bin/python scripts/build_tiny_tokenizer.py
It writes src/deepfleet/assets/tiny_tokenizer/{tokenizer.json,tokenizer_config.json,
special_tokens_map.json}; commit the result. The output is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models

OUT_DIR = Path(__file__).resolve().parents[1] / "src/deepfleet/assets/tiny_tokenizer"

PAD, EOS, UNK = "<|pad|>", "<|im_end|>", "<|unk|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, EOS]
# Role names as single (non-special) tokens keep chat sequences short, so the tiny model trains faster.
ROLE_TOKENS = ["system", "user", "assistant"]

# ChatML, the layout Qwen and many instruct models use. No default system prompt: the tiny
# model's sequences stay short.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def character_vocab() -> dict[str, int]:
    """Special tokens first, then newline, tab and printable ASCII, one id per character."""
    characters = ["\n", "\t"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    return vocab


def build_tokenizer() -> Tokenizer:
    # BPE without merges and without a pre-tokenizer splits text into single characters;
    # the Fuse decoder joins them back without spaces.
    tokenizer = Tokenizer(models.BPE(vocab=character_vocab(), merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens(ROLE_TOKENS)
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "pad_token": PAD,
        "eos_token": EOS,
        "unk_token": UNK,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(OUT_DIR / "tokenizer.json"))
    (OUT_DIR / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    (OUT_DIR / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {OUT_DIR} ({build_tokenizer().get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
