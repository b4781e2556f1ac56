"""The planner picks the first setting in speed order that fits, and hits the global batch exactly."""

import functools

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.plan.choose import (FleetShape, Workload, choose_zero_setting, evaluate_setting,
                                   micro_batch_candidates, plan_fixed_setting, setting_tiers, solve_batch_layout)
from deepfleet.plan.memory import model_shape_from_config
from plan_model_configs import MODELS

GiB = 2**30


@functools.cache
def shape(name):
    return model_shape_from_config(MODELS[name][0]())


def gpus(nodes=1, per_node=8, mem=80, gbps=None, host=1024):
    return FleetShape(nodes=nodes, ranks_per_node=per_node, accelerator="cuda", device_memory_bytes=mem * GiB,
                      host_memory_bytes=host * GiB, bf16_supported=True, inter_host_gbps=gbps)


def work(global_batch=64, micro=4, seq=2048, ckpt=True):
    return Workload(global_batch=global_batch, micro_batch=micro, seq_len=seq, precision="bf16",
                    gradient_checkpointing=ckpt)


def assert_first_fitting(plan):
    """The chosen setting fits; no earlier tier fits at any valid micro batch; within its tier nothing fits at a
    larger micro batch, and no lower stage fits at the chosen one."""
    choice, fleet, w = plan.choice, plan.fleet, plan.workload

    def fits(setting, micro):
        return evaluate_setting(plan.shape, fleet, w, stage=setting[0], offload=setting[1], micro_batch=micro).fits

    micros = micro_batch_candidates(global_batch=w.global_batch, world_size=fleet.world_size, most=w.micro_batch)
    tiers = setting_tiers(fleet)
    chosen = (choice.stage, choice.offload)
    tier_index = next(i for i, tier in enumerate(tiers) if chosen in tier)
    assert fits(chosen, choice.micro_batch)
    for tier in tiers[:tier_index]:
        assert not any(fits(s, m) for s in tier for m in micros)
    tier = tiers[tier_index]
    assert not any(fits(s, m) for s in tier for m in micros if m > choice.micro_batch)
    assert not any(fits(s, choice.micro_batch) for s in tier[:tier.index(chosen)])
    assert choice.micro_batch * choice.grad_accum * fleet.world_size == w.global_batch


@pytest.mark.parametrize("name,fleet,expected_stage", [
    ("Qwen2.5-0.5B", gpus(per_node=1), 0),           # small model on one GPU: no ZeRO needed
    ("Llama-3-8B", gpus(), 1),                        # 8B full fine-tune on 8x80 GiB: ZeRO-1 at micro 4
    ("Llama-3-8B", gpus(mem=40), 2),                  # ... on 8x40 GiB: ZeRO-2 at a lower micro batch
    ("Llama-2-70B", gpus(nodes=4, gbps=200), 3),      # 70B on 32 GPUs with a fast link
])
def test_picks_least_communication_that_fits(name, fleet, expected_stage):
    plan = choose_zero_setting(shape(name), fleet, work())
    assert_first_fitting(plan)
    assert plan.choice.stage == expected_stage


def test_reason_says_how_often_the_chosen_stage_reduces_gradients():
    """ZeRO-2 reduces on every micro batch under accumulation (DeepSpeed's engine), ZeRO-0/1 once per step."""
    one_gpu = gpus(per_node=1)
    accumulating = choose_zero_setting(shape("Qwen2.5-0.5B"), one_gpu, work(global_batch=64, micro=4))
    assert (accumulating.choice.stage, accumulating.choice.grad_accum) == (0, 16)
    assert "once per step, where ZeRO-2 would on each of the 16 micro batches" in accumulating.choice.reason
    single = choose_zero_setting(shape("Qwen2.5-0.5B"), one_gpu, work(global_batch=4, micro=4))
    assert single.choice.grad_accum == 1
    assert "move the same bytes per step" in single.choice.reason
    zero2 = choose_zero_setting(shape("Llama-3-8B"), gpus(mem=40), work())
    assert zero2.choice.stage == 2
    assert f"(ZeRO-0/1 do not); it reduces the gradients on each of the {zero2.choice.grad_accum} micro batches" \
        in zero2.choice.reason


def test_slow_link_prefers_offload_over_zero3_across_hosts():
    fast = choose_zero_setting(shape("Mistral-7B"), gpus(nodes=2, per_node=4, mem=24, gbps=200, host=512), work())
    slow = choose_zero_setting(shape("Mistral-7B"), gpus(nodes=2, per_node=4, mem=24, gbps=10, host=512), work())
    assert_first_fitting(fast)
    assert_first_fitting(slow)
    assert (fast.choice.stage, fast.choice.offload) == (3, "none")
    assert (slow.choice.stage, slow.choice.offload) == (2, "optimizer")
    assert "slow" in slow.choice.reason


def test_zero3_across_slow_hosts_warns():
    small_host = gpus(nodes=2, per_node=4, mem=24, gbps=10, host=128)  # offload cannot fit in 128 GiB hosts
    plan = choose_zero_setting(shape("Mistral-7B"), small_host, work())
    assert plan.choice.stage == 3
    assert any("10 Gbit/s" in w for w in plan.choice.warnings)


def test_micro_batch_lowered_to_fit_and_divides_global_batch():
    plan = choose_zero_setting(shape("Llama-3-8B"), gpus(), work(micro=64, global_batch=512, ckpt=False, seq=4096))
    assert plan.choice.micro_batch < 64
    assert 512 % (plan.choice.micro_batch * 8) == 0
    assert "lowered" in plan.choice.reason


def test_micro_batch_candidates_divide_exactly():
    assert micro_batch_candidates(global_batch=96, world_size=8, most=8) == [6, 4, 3, 2, 1]
    with pytest.raises(DeepfleetError, match="cannot be split evenly"):
        micro_batch_candidates(global_batch=12, world_size=8, most=4)


def test_nothing_fits_is_a_user_error_with_fixes():
    with pytest.raises(DeepfleetError) as err:
        choose_zero_setting(shape("Llama-2-70B"), gpus(per_node=1, mem=24, host=32), work(global_batch=8, ckpt=False))
    assert "gradient_checkpointing" in err.value.problems[0].fix


def test_cpu_ranks_plan_without_offload():
    cpu = FleetShape(nodes=1, ranks_per_node=2, accelerator="cpu", device_memory_bytes=24 * GiB,
                     host_memory_bytes=24 * GiB)
    w = Workload(global_batch=8, micro_batch=2, seq_len=256, precision="fp32", gradient_checkpointing=False)
    plan = choose_zero_setting(shape("Qwen2.5-0.5B"), cpu, w)
    assert all(row.offload == "none" for row in plan.rows)
    assert plan.choice.offload == "none"
    assert_first_fitting(plan)


def test_fixed_setting_keeps_recipe_choice_and_warns_when_it_does_not_fit():
    plan = plan_fixed_setting(shape("Llama-3-8B"), gpus(per_node=1, mem=24), work(global_batch=8), stage=0,
                              offload="none")
    assert (plan.choice.stage, plan.choice.reason) == (0, "set in the recipe")
    assert any("does not fit" in w for w in plan.choice.warnings)


def test_batch_layout_error_shows_numbers_and_fix():
    with pytest.raises(DeepfleetError) as err:
        solve_batch_layout(global_batch=20, micro_batch=4, world_size=3)
    assert "20" in str(err.value) and "train.global_batch=12 or 24" in str(err.value)
