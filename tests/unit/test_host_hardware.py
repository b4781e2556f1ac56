"""A host's hardware as planning reads it from its probe facts."""

from deepfleet.fleet.host_hardware import bf16_capable


def test_bf16_from_compute_capability_else_the_gpu_table():
    assert bf16_capable("9.0", "NVIDIA H100 80GB HBM3", "nvidia") and not bf16_capable("7.5", "Tesla T4", "nvidia")
    assert bf16_capable(None, "NVIDIA A100-SXM4-80GB", "nvidia") and not bf16_capable(None, "Tesla V100-SXM2-32GB", "nvidia")
    assert not bf16_capable(None, "Some Future GPU", "nvidia") and bf16_capable(None, "AMD Instinct MI300X", "amd")
