"""deepspeed_config_for_run: explicit stage, planner's choice (`deepspeed: auto`) and the user's JSON."""

import json

import pytest
from deepfleet.errors import DeepfleetError
from deepfleet.plan.choose import FleetShape
from deepfleet.plan.deepspeed_config import deepspeed_config_for_run, resolve_run_config
from deepfleet.plan.memory import model_shape_from_config
from deepfleet.plan.recipe_io import parse_recipe
from plan_model_configs import llama3_8b

GiB = 2**30


def recipe(text=""):
    return parse_recipe("train: {global_batch: 64, micro_batch: 4}\n" + text)


def run(r, world=8, **kwargs):
    return deepspeed_config_for_run(r, world_size=world, total_steps=50, accelerator=kwargs.pop("accelerator", "cuda"),
                                    bf16_supported=True, **kwargs)


def test_explicit_stage_keeps_recipe_settings_with_the_engines_call():
    config = run(recipe("deepspeed: {zero: 3, offload_optimizer: cpu}"))
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["bf16"]["enabled"] is True


def deepspeed_lrs(section: dict, steps: int, lr: float) -> list[float]:
    """The lr of each of the first `steps` optimizer steps under DeepSpeed's own scheduler for `section`,
    started as the training loop starts it and stepped as the engine does: after each optimizer step."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepfleet.train.loop import start_warmup_at_its_first_step
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = getattr(lr_schedules, section["type"])(optimizer, **section["params"])
    start_warmup_at_its_first_step(scheduler)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_no_warmup_trains_the_first_step_at_the_full_lr_and_a_warmup_rises_from_zero(schedule):
    text = "train: {global_batch: 64, micro_batch: 4, lr: 0.001, max_steps: 100, schedule: %s, warmup: %s}"
    flat = run(parse_recipe(text % (schedule, 0)))["scheduler"]
    assert flat["params"]["warmup_num_steps"] == 1          # DeepSpeed refuses 0
    assert deepspeed_lrs(flat, 2, 1e-3) == pytest.approx([1e-3, 1e-3])
    warm = deepspeed_lrs(run(parse_recipe(text % (schedule, 10)))["scheduler"], 12, 1e-3)
    assert warm[0] == 0.0 and warm[1] == pytest.approx(1e-4) and warm[5] == pytest.approx(5e-4)
    assert warm[10] == pytest.approx(1e-3, rel=0.01)        # step k has lr k / warmup, as in transformers
    fraction = run(parse_recipe(text % (schedule, 0.03)))["scheduler"]     # 3% of run()'s 50 steps
    assert fraction["params"]["warmup_num_steps"] == 2      # rounded up, as transformers' warmup_ratio


def test_auto_uses_the_planners_choice():
    shape = model_shape_from_config(llama3_8b())
    fleet = FleetShape(nodes=1, ranks_per_node=8, accelerator="cuda", device_memory_bytes=40 * GiB,
                       host_memory_bytes=1024 * GiB, bf16_supported=True)
    resolved = resolve_run_config(recipe("deepspeed: auto\ndata: {max_length: 2048}"), world_size=8,
                                  total_steps=50, accelerator="cuda", bf16_supported=True, model_shape=shape,
                                  fleet=fleet)
    choice = resolved.plan.choice
    assert resolved.source == "planner"
    assert resolved.config["zero_optimization"]["stage"] == choice.stage
    assert resolved.config["train_micro_batch_size_per_gpu"] == choice.micro_batch
    assert resolved.config["train_batch_size"] == 64
    assert resolved.config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096


def test_auto_without_model_or_fleet_says_what_is_missing():
    with pytest.raises(DeepfleetError, match="deepspeed: auto needs the model config"):
        run(recipe("deepspeed: auto"))


def test_offload_params_without_zero3_in_recipe():
    with pytest.raises(DeepfleetError, match="offloading parameters needs ZeRO-3"):
        run(recipe("deepspeed: {zero: 2, offload_params: cpu}"))


def test_user_json_from_recipe_path(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                "zero_optimization": {"stage": 3}}))
    resolved = resolve_run_config(recipe(f"deepspeed: {{config: {path}}}"), world_size=8, total_steps=50,
                                  accelerator="cuda", bf16_supported=True)
    assert resolved.source == str(path)
    assert resolved.config["train_batch_size"] == 64 and resolved.config["train_micro_batch_size_per_gpu"] == 4
    assert resolved.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "gradient_accumulation_steps not set: 2" in resolved.notes
    assert len(resolved.notes) == 4


def test_user_json_problems_name_the_file(tmp_path):
    with pytest.raises(DeepfleetError) as err:
        run(recipe("deepspeed: {config: ds.json}"), user_config_text='{"zero_optimization": {"stgae": 2}}')
    assert err.value.problems[0].where == "ds.json:zero_optimization.stgae"


def test_missing_user_json_is_a_user_error(tmp_path):
    with pytest.raises(DeepfleetError, match="cannot read DeepSpeed config"):
        run(recipe(f"deepspeed: {{config: {tmp_path / 'nope.json'}}}"))


def test_cpu_config_uses_torch_adam_and_fp32():
    config = run(recipe(), world=2, accelerator="cpu")
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False


def eight_gpus(mem=40):
    return FleetShape(nodes=1, ranks_per_node=8, accelerator="cuda", device_memory_bytes=mem * GiB,
                      host_memory_bytes=1024 * GiB, bf16_supported=True)


def test_auto_from_a_transformers_config_via_the_engines_entry_point():
    config = run(recipe("deepspeed: auto\ndata: {max_length: 2048}"), model_config=llama3_8b(), fleet=eight_gpus())
    shape = model_shape_from_config(llama3_8b())
    assert config["zero_optimization"]["reduce_bucket_size"] == shape.hidden_size ** 2
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 8 == 64


def test_user_json_plan_shows_the_users_setting():
    resolved = resolve_run_config(recipe("deepspeed: {config: ds.json}"), world_size=8, total_steps=50,
                                  accelerator="cuda", bf16_supported=True,
                                  model_shape=model_shape_from_config(llama3_8b()), fleet=eight_gpus(mem=80),
                                  user_config_text='{"zero_optimization": {"stage": 3, "offload_optimizer": '
                                                   '{"device": "cpu"}}, "train_micro_batch_size_per_gpu": "auto"}')
    choice = resolved.plan.choice
    assert (choice.stage, choice.offload, choice.reason) == (3, "optimizer", "set in ds.json")
    assert choice.micro_batch == resolved.config["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("text", ["deepspeed: auto", "deepspeed: {zero: 1}",
                                  "deepspeed: {zero: 3, offload_optimizer: cpu, offload_params: cpu}"])
def test_configs_are_accepted_by_deepspeeds_parser(text):
    from deepspeed.runtime.config import DeepSpeedConfig

    from deepfleet.plan.deepspeed_schema import find_unknown_keys

    fleet = FleetShape(nodes=1, ranks_per_node=1, accelerator="cpu", device_memory_bytes=16 * GiB,
                       host_memory_bytes=16 * GiB)
    config = deepspeed_config_for_run(parse_recipe("train: {global_batch: 8, micro_batch: 2}\n" + text), world_size=1,
                                      total_steps=10, accelerator="cpu", bf16_supported=False,
                                      model_config=plan_tiny(), fleet=fleet)
    assert find_unknown_keys(config) == []
    parsed = DeepSpeedConfig(config)
    assert parsed.train_batch_size == 8
    assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]


def plan_tiny():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=300)


def adam(accelerator, offload="none", prebuilt=frozenset()):
    from deepfleet.plan.deepspeed_config import optimizer_section

    section = optimizer_section(lr=1e-4, weight_decay=0.0, accelerator=accelerator, offload_device=offload,
                                prebuilt_ops=prebuilt)
    assert section["type"] == "AdamW" and section["params"]["lr"] == 1e-4
    return {k: v for k, v in section["params"].items() if k in ("torch_adam", "fused")}


def test_optimizer_needs_no_build_unless_the_run_offloads_or_fused_adam_is_prebuilt():
    assert adam("cpu") == {"torch_adam": True}
    assert adam("cuda") == {"torch_adam": True, "fused": True}                   # torch's fused AdamW kernel
    assert adam("cuda", prebuilt=frozenset({"fused_adam", "cpu_adam"})) == {}   # DeepSpeed's FusedAdam, prebuilt
    assert adam("cuda", offload="cpu") == adam("cuda", offload="nvme") == {}    # DeepSpeedCPUAdam (op cpu_adam)
    assert adam("cpu", offload="cpu") == {}


def test_run_config_takes_the_prebuilt_ops():
    assert "torch_adam" in run(recipe())["optimizer"]["params"]
    assert "torch_adam" not in run(recipe(), prebuilt_ops=frozenset({"fused_adam"}))["optimizer"]["params"]


def test_deepspeed_passes_fused_through_to_torch_adamw():
    """What the engine does with the section: torch_adam -> torch.optim.AdamW(params, **rest)."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from deepfleet.plan.deepspeed_config import optimizer_section

    params = dict(optimizer_section(lr=1e-3, weight_decay=0.0, accelerator="cuda", offload_device="none")["params"])
    kind, kwargs = DeepSpeedEngine.get_optimizer_configuration(SimpleNamespace(), params, True)
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = kind([weight], **params, **kwargs)
    assert kind is torch.optim.AdamW and optimizer.defaults["fused"] is True
    weight.grad = torch.ones(4)
    optimizer.step()   # torch's fused kernel also runs on CPU
    assert weight.detach().lt(1).all()
