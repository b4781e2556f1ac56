"""A user's DeepSpeed JSON: every problem one line, all at once; "auto" filled from the recipe and reported."""

import json
from dataclasses import replace

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from deepfleet.errors import DeepfleetError
from deepfleet.plan.deepspeed_config import build_deepspeed_config
from deepfleet.plan.deepspeed_json import parse_deepspeed_json
from deepfleet.plan.deepspeed_user_config import ConfigContext, check_user_deepspeed_config
from deepfleet.plan.recipe_io import parse_recipe

SOURCE = "ds.json"


def context(world=4, bf16=True, accelerator="cuda", hidden=1024, **recipe_overrides):
    recipe = parse_recipe("train: {global_batch: 32, micro_batch: 2, lr: 0.0003}\nprecision: auto",
                          overrides=[f"{k}={v}" for k, v in recipe_overrides.items()])
    reference = build_deepspeed_config(recipe, stage=2, world_size=world, total_steps=100,
                                       accelerator=accelerator, bf16_supported=bf16)
    return ConfigContext(reference=reference, world_size=world, hidden_size=hidden, bf16_supported=bf16,
                         accelerator=accelerator)


def problems_of(config, ctx=None):
    with pytest.raises(DeepfleetError) as err:
        check_user_deepspeed_config(config, ctx or context(), SOURCE)
    assert err.value.exit_code == 2
    return [p.render() for p in err.value.problems]


HF_STYLE = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
}


def test_auto_values_filled_from_recipe_and_reported():
    checked = check_user_deepspeed_config(HF_STYLE, context(), SOURCE)
    config = checked.config
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (32, 2, 4)
    assert config["optimizer"]["params"]["lr"] == 0.0003
    assert config["scheduler"]["params"]["warmup_max_lr"] == 0.0003
    assert config["scheduler"]["params"]["total_num_steps"] == 100
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 1024 * 1024
    assert "auto" not in json.dumps(config)
    assert any(note.startswith('train_batch_size: "auto" -> 32') for note in checked.notes)
    assert len([n for n in checked.notes if '"auto"' in n]) == 15


def test_filled_config_is_accepted_by_deepspeed():
    checked = check_user_deepspeed_config(HF_STYLE, context(world=1, bf16=False, accelerator="cpu"), SOURCE)
    parsed = DeepSpeedConfig(checked.config)
    assert parsed.train_batch_size == 32 and parsed.gradient_accumulation_steps == 16


def test_unknown_keys_with_did_you_mean_at_any_level():
    lines = problems_of({"zero_optimization": {"stage": 2, "overlap_com": True}, "gradient_clippin": 1.0})
    assert any('ds.json:zero_optimization.overlap_com: unknown DeepSpeed key zero_optimization.overlap_com '
               '(did you mean "overlap_comm"?)' in line for line in lines)
    assert any('(did you mean "gradient_clipping"?)' in line for line in lines)


def test_removed_key_reports_deepspeeds_reason():
    [line] = problems_of({"elasticity": {"enabled": True}})
    assert "no longer supported by DeepSpeed" in line and "fix: remove elasticity" in line


def test_batch_identity_shows_three_numbers_and_fix():
    [line] = problems_of({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 2,
                          "gradient_accumulation_steps": 4})
    assert "train_batch_size 30 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 4 x " \
           "world size 4 (= 32)" in line
    assert "set train_batch_size to 32" in line


def test_batch_values_that_disagree_with_recipe():
    [line] = problems_of({"train_micro_batch_size_per_gpu": 8})
    assert "train_micro_batch_size_per_gpu 8 vs recipe 2" in line


def test_fp16_and_bf16_both_enabled():
    lines = problems_of({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert any("fp16 and bf16 are both enabled" in line for line in lines)


@pytest.mark.parametrize("accelerator,bf16", [("cuda", False), ("cpu", False)])
def test_bf16_on_hardware_without_it(accelerator, bf16):
    [line] = problems_of({"bf16": {"enabled": True}}, context(accelerator=accelerator, bf16=bf16))
    assert "bf16 is enabled but" in line and "ds.json:bf16.enabled" in line


def test_nvme_offload_without_path():
    [line] = problems_of({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"},
                                                "stage3_gather_16bit_weights_on_model_save": True}})
    assert "offload_param to nvme without nvme_path" in line


def test_offload_params_without_zero3():
    [line] = problems_of({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert "offload_param needs ZeRO-3, but stage is 2" in line


def test_zero3_without_gather_on_save_is_fixed_with_a_note():
    checked = check_user_deepspeed_config({"zero_optimization": {"stage": 3}}, context(), SOURCE)
    assert checked.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert any("stage3_gather_16bit_weights_on_model_save set to true" in n for n in checked.notes)


def test_all_problems_reported_at_once():
    lines = problems_of({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}, "stag": 1},
                         "fp16": {"enabled": True}, "bf16": {"enabled": True},
                         "train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 1})
    assert len(lines) == 4   # unknown key, batch identity, fp16+bf16, offload_param without ZeRO-3


def test_json_error_has_line_number():
    with pytest.raises(DeepfleetError) as err:
        parse_deepspeed_json('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": [true,}\n}', SOURCE)
    [problem] = err.value.problems
    assert problem.where.startswith("ds.json:3:") and problem.what.startswith("not valid JSON: ")


HJSON_STYLE = """{
  // DeepSpeed reads its config with hjson: comments and trailing commas are fine
  "train_micro_batch_size_per_gpu": 2,  # per GPU
  /* a block
     comment */
  "zero_optimization": {"stage": 2,},
}
"""


def deepspeed_loads_file(tmp_path, text):
    """DeepSpeed's own reading of a config file (the path form: hjson with its duplicate-key hook)."""
    path = tmp_path / "ds.json"
    path.write_text(text)
    return DeepSpeedConfig(str(path))


def test_comments_and_trailing_commas_are_accepted_like_deepspeed(tmp_path):
    assert parse_deepspeed_json(HJSON_STYLE, SOURCE) == {"train_micro_batch_size_per_gpu": 2,
                                                          "zero_optimization": {"stage": 2}}
    assert deepspeed_loads_file(tmp_path, HJSON_STYLE).train_micro_batch_size_per_gpu == 2


@pytest.mark.parametrize("text, key, line, first", [
    ('{\n  "train_batch_size": 8,\n  "train_batch_size": 16\n}', "train_batch_size", 3, 2),
    ('{"bf16": {"enabled": true},\n "zero_optimization": {"stage": 2,\n   "stage": 3}}', "stage", 3, 2),
    ('{"fp16": {"enabled": false}, "bf16": {"enabled": true}, // not a duplicate: other objects\n'
     ' "fp16": {}}', "fp16", 2, 1),
])
def test_duplicate_key_names_the_key_and_line_like_deepspeed_refuses_it(tmp_path, text, key, line, first):
    with pytest.raises(DeepfleetError) as err:
        parse_deepspeed_json(text, SOURCE)
    [problem] = err.value.problems
    assert problem.where == f"ds.json:{line}"
    assert problem.what == f'duplicate key "{key}" (first on line {first}); DeepSpeed refuses it'
    with pytest.raises(ValueError, match="Duplicate keys"):
        deepspeed_loads_file(tmp_path, text)


def test_number_hjson_cannot_hold_is_one_line():
    with pytest.raises(DeepfleetError) as err:
        parse_deepspeed_json('{"gradient_clipping": 1e999}', SOURCE)
    assert err.value.problems[0].where == "ds.json" and "not valid JSON" in err.value.problems[0].what


def test_missing_batch_values_come_from_the_recipe():
    checked = check_user_deepspeed_config({"train_batch_size": 32}, context(), SOURCE)
    assert (checked.config["train_micro_batch_size_per_gpu"], checked.config["gradient_accumulation_steps"]) == (2, 4)
    assert "train_micro_batch_size_per_gpu not set: 2" in checked.notes


def test_without_a_recipe_missing_batch_values_are_derived_like_deepspeed():
    ctx = replace(context(), recipe_given=False)
    checked = check_user_deepspeed_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, ctx, SOURCE)
    assert checked.config["gradient_accumulation_steps"] == 2
    [line] = problems_of({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, ctx)
    assert "world size 4" in line


@pytest.mark.parametrize("config,where", [
    ({"zero_optimization": {"stage": 9}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage"),
    ({"zero_optimization": []}, "zero_optimization"),
    ({"zero_optimization": None}, "zero_optimization"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}, "zero_optimization.offload_optimizer"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled"),
    ({"tensorboard": {"enabled": 1}}, "tensorboard.enabled"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "AdamW", "params": [0.1]}}, "optimizer.params"),
    ({"train_batch_size": -16}, "train_batch_size"),
    ({"train_batch_size": "x", "train_micro_batch_size_per_gpu": 8}, "train_batch_size"),
    ({"gradient_clipping": "auto-ish"}, "gradient_clipping"),
])
def test_wrong_types_and_ranges_name_the_json_key(config, where):
    for ctx in (context(), replace(context(), recipe_given=False)):
        [line] = problems_of(config, ctx)
        assert line.startswith(f"ds.json:{where}: {where} must be "), line


def test_nested_sections_may_be_null():
    checked = check_user_deepspeed_config({"zero_optimization": {"stage": 2, "offload_optimizer": None}},
                                          context(), SOURCE)
    assert checked.config["zero_optimization"]["stage"] == 2
