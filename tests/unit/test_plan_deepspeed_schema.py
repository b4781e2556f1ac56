"""The DeepSpeed key schema comes from DeepSpeed itself, and catches what DeepSpeed silently ignores."""

import types

from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from deepfleet.plan.deepspeed_schema import deepspeed_key_schema, find_non_objects, find_unknown_keys


def test_deepspeed_itself_ignores_a_misspelled_section():
    """Why the schema exists: DeepSpeed's parser accepts the typo and trains without ZeRO."""
    parsed = types.SimpleNamespace()
    DeepSpeedConfig._initialize_params(parsed, {"train_batch_size": 8, "zero_optimisation": {"stage": 3}})
    assert parsed.zero_optimization_stage == 0
    [unknown] = find_unknown_keys({"train_batch_size": 8, "zero_optimisation": {"stage": 3}})
    assert unknown.key == "zero_optimisation" and "zero_optimization" in unknown.known


def test_schema_covers_top_level_and_nested_sections():
    schema = deepspeed_key_schema()
    for key in ("train_batch_size", "gradient_accumulation_steps", "zero_optimization", "bf16", "fp16",
                "optimizer", "scheduler", "activation_checkpointing", "autotuning", "tensorboard", "aio"):
        assert key in schema, key
    zero = schema["zero_optimization"]
    assert {"stage", "overlap_comm", "stage3_gather_16bit_weights_on_model_save", "reduce_bucket_size"} <= set(zero)
    assert "nvme_path" in zero["offload_optimizer"] and "pin_memory" in zero["offload_param"]
    assert "partition_activations" in schema["activation_checkpointing"]


def test_zero_keys_agree_with_deepspeeds_model():
    """Every zero_optimization key in the schema is one DeepSpeed's pydantic model accepts by that name."""
    for key in deepspeed_key_schema()["zero_optimization"]:
        if key in ("offload_optimizer", "offload_param", "zenflow", "leaf_module"):
            continue
        field = next((f for name, f in DeepSpeedZeroConfig.model_fields.items() if key in (name, f.alias)), None)
        assert field is not None, key


def test_unknown_keys_found_at_every_level_and_params_are_free_form():
    config = {"zero_optimization": {"stage": 2, "overlap_com": True,
                                    "offload_optimizer": {"device": "cpu", "pin_memroy": True}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "any_optimizer_kwarg": 1}},
              "steps_per_print": 10}
    unknown = {u.dotted for u in find_unknown_keys(config)}
    assert unknown == {"zero_optimization.overlap_com", "zero_optimization.offload_optimizer.pin_memroy"}


def test_sections_that_must_be_objects():
    config = {"zero_optimization": {"stage": 2, "offload_param": None, "offload_optimizer": "cpu"},
              "bf16": [], "fp16": None, "optimizer": {"type": "AdamW", "params": 3}, "train_batch_size": 8}
    assert set(find_non_objects(config)) == {("zero_optimization", "offload_optimizer"), ("bf16",), ("fp16",)}
