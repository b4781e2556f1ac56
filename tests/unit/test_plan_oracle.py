"""Model-state memory agrees with DeepSpeed's own estimators within 1% (DeepSpeed is the oracle)."""

import functools

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from deepfleet.plan.memory import estimate_model_state_bytes, model_shape_from_config
from plan_model_configs import MODELS

LAYOUTS = [(1, 1), (1, 8), (2, 8), (4, 8), (3, 4)]   # (nodes, gpus per node)


@functools.cache
def shape_of(name):
    factory, _ = MODELS[name]
    return model_shape_from_config(factory())


def within_one_percent(ours: int, oracle: int) -> bool:
    return abs(ours - oracle) <= 0.01 * oracle


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_matches_published(name):
    assert shape_of(name).total_params == MODELS[name][1]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_matches_deepspeed(name, nodes, gpus, offload):
    shape = shape_of(name)
    cpu, gpu = estimate_zero2_model_states_mem_needs(shape.total_params, num_gpus_per_node=gpus, num_nodes=nodes,
                                                     cpu_offload=offload == "optimizer")
    ours = estimate_model_state_bytes(shape, stage=2, offload=offload, nodes=nodes, ranks_per_node=gpus)
    assert within_one_percent(ours.device_bytes, gpu), (ours.device_bytes, gpu)
    assert within_one_percent(ours.host_bytes, cpu), (ours.host_bytes, cpu)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_matches_deepspeed(name, nodes, gpus, offload):
    shape = shape_of(name)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.total_params, shape.largest_layer_params, num_gpus_per_node=gpus, num_nodes=nodes,
        cpu_offload=offload != "none", cpu_offload_params=offload == "optimizer+params", zero_init=True)
    ours = estimate_model_state_bytes(shape, stage=3, offload=offload, nodes=nodes, ranks_per_node=gpus)
    assert within_one_percent(ours.device_bytes, gpu), (ours.device_bytes, gpu)
    assert within_one_percent(ours.host_bytes, cpu), (ours.host_bytes, cpu)
