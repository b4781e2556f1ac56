"""Fuzz the recipe parser (YAML and `key=value` overrides) and the DeepSpeed JSON parser (hjson syntax): any
mutation of a valid input ends in a parsed value or a DeepfleetError, never another exception."""

from hypothesis import example, given, strategies as st

from deepfleet.plan.deepspeed_json import parse_deepspeed_json
from deepfleet.plan.recipe_io import parse_recipe
from fuzz_inputs import WEIRD_STRINGS, damaged, json_text, outcome, yaml_text

VALID_RECIPE = {
    "model": {"name": "builtin:tiny", "attn_implementation": "auto"},
    "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "data": {"train": ["data.jsonl"], "format": "auto", "max_length": 128, "packing": True,
             "validation": {"split": 0.1, "files": [], "every_steps": 10}},
    "train": {"max_steps": 10, "global_batch": 16, "micro_batch": 4, "lr": 3e-4, "schedule": "cosine", "warmup": 2,
              "seed": 1},
    "precision": "auto", "deepspeed": {"zero": 2, "offload_optimizer": "none"},
    "checkpoint": {"every_steps": 5, "keep": 2}, "logging": {"every_steps": 1, "peak_tflops": 100.0},
    "output_dir": "runs/x", "resume": True, "env": {"NCCL_DEBUG": "INFO"},
}
VALID_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
    "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}},
}
OVERRIDE_KEYS = ["train.lr", "train", "model", "model.revision", "deepspeed", "deepspeed.zero", "data.train",
                 "a.b.c", "lora.r", ".", "train..lr", "env.X", "output_dir", "data.validation.split"]
override = st.builds(lambda key, value: f"{key}={value}",
                     st.one_of(st.sampled_from(OVERRIDE_KEYS), st.text(max_size=6)),
                     st.one_of(st.sampled_from(WEIRD_STRINGS + ["{a: 1}", "[1, 2", "'x", "&a", "*a", "!!python/x"]),
                               st.text(max_size=8)))


@given(yaml_text(VALID_RECIPE), st.lists(override, max_size=3))
@example("model: x\n", ["model.revision.x=1"])
@example("train: 3\n", ["train.lr.x=1"])
@example("", ["train.lr=\x1b"])   # a character YAML forbids in a value: was a two-line message
@example("", ["train.lr=a\nb"])   # a line break in an override: was echoed, splitting the error line
@example("", ["[=1"])   # an unknown key that looks like a pydantic tag: was an IndexError
@example("train:\n  a[b]: 1\n", [])
@example("? '\n\n  '\n: null\n", [])   # a key with a line break: the same
def test_fuzz_recipe(text, overrides):
    outcome(lambda: parse_recipe(text, "recipe.yaml", overrides))


@given(json_text(VALID_DEEPSPEED))
@example('{"a": 1e999}')
@example('{\n  a: 1,\n  /* ')   # cut short inside a comment: was an IndexError from hjson
@example('{"a": 1, "a": 2}')
def test_fuzz_deepspeed_json(text):
    outcome(lambda: parse_deepspeed_json(text, "ds.json"))


@st.composite
def hjson_text(draw):
    """Hjson's own syntax (comments, unquoted keys and strings, trailing commas), damaged."""
    text = "{\n  // zero\n  zero_optimization: {stage: 2, # comment\n  },\n  bf16: {enabled: true,},\n" \
           "  /* block */ optimizer: {type: AdamW}\n  name: unquoted string\n  '''multi''': '''x'''\n}\n"
    return damaged(draw, text)


@given(hjson_text())
def test_fuzz_deepspeed_hjson(text):
    outcome(lambda: parse_deepspeed_json(text, "ds.json"))
