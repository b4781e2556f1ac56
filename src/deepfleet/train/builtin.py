"""The `builtin:tiny` model and its built-in data: what `make demo` and the tests train.

The model is a small Llama built from a config (no download), with the character-level
tokenizer shipped in `deepfleet/assets/tiny_tokenizer`. The data are the tasks in
`builtin_tasks.py`, in messages format; `heldout_prompts` gives prompts never seen in training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deepfleet.plan.recipe import BUILTIN_DATA as BUILTIN_DATA_NAME, TINY_MODEL_NAME  # noqa: F401 (re-exported)
from deepfleet.train.builtin_tasks import generate_examples

if TYPE_CHECKING:   # the head reads built-in data without importing transformers (seconds)
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

BUILTIN_TRAIN_RECORDS = 20_000   # records `builtin:tasks` yields as training data

# Sized so 2 ranks sharing 2 CPU cores learn the tasks in a few minutes: ~330k parameters.
# benchmarks/tune_builtin_tasks.py: 2 layers x 96 reached >= 55% held-out exact match by step 200
# on 4 seeds, in fewer seconds than 3-4 layers x 96-128 or 2 layers x 64.
TINY_HIDDEN = 96
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_MAX_POSITIONS = 1024


def builtin_model_config(tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A small Llama config matching `tokenizer`; build the model with `AutoModelForCausalLM.from_config`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_HIDDEN * 4,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=TINY_MAX_POSITIONS,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def builtin_task_records(n: int, *, seed: int, split: str) -> list[dict]:
    """`n` records `{"messages": [user, assistant]}`; "train" and "heldout" prompts never overlap."""
    return [
        {"messages": [{"role": "user", "content": example.prompt},
                      {"role": "assistant", "content": example.answer}]}
        for example in generate_examples(n, seed=seed, split=split)
    ]


def heldout_prompts(n: int, *, seed: int) -> list[tuple[list[dict], str]]:
    """`n` pairs (prompt messages without the answer, expected answer) for exact-match evaluation."""
    return [([{"role": "user", "content": example.prompt}], example.answer)
            for example in generate_examples(n, seed=seed, split="heldout")]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer, ignoring surrounding whitespace."""
    return prediction.strip() == answer.strip()
