"""The dense 16-bit peak table, looked up by the exact names drivers report, and its stdlib-only import."""

import subprocess
import sys

import pytest

from deepfleet.gpu_peaks import bf16_supported_by_name, gpu_peak

REPORTED = [   # name as torch.cuda.get_device_name / nvidia-smi / rocm-smi print it -> (model, bf16, fp16)
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4, 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 835.5),
    ("NVIDIA GH200 480GB", "GH200", 989.4, 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0, 312.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0, 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0, 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0, 312.0),
    ("NVIDIA L40S", "L40S", 362.05, 362.05),
    ("NVIDIA L40", "L40", 181.05, 181.05),
    ("NVIDIA L4", "L4", 121.0, 121.0),
    ("NVIDIA A10G", "A10G", 70.0, 70.0),
    ("NVIDIA A10", "A10", 125.0, 125.0),
    ("NVIDIA A40", "A40", 149.7, 149.7),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2, 165.2),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71.0, 71.0),
    ("Tesla V100-SXM2-32GB", "V100 SXM2", None, 125.0),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", None, 125.0),
    ("Tesla V100-PCIE-16GB", "V100 PCIe", None, 112.0),
    ("Tesla V100S-PCIE-32GB", "V100S", None, 130.0),
    ("Tesla T4", "T4", None, 65.0),
    ("Tesla P100-PCIE-16GB", "P100 PCIe", None, 18.7),
    ("AMD Instinct MI300X", "MI300X", 1307.4, 1307.4),
    ("AMD Instinct MI250X", "MI250X (one of two dies)", 191.5, 191.5),
    ("AMD Instinct MI250X / MI250", "MI250X (one of two dies)", 191.5, 191.5),
    ("AMD Instinct MI250", "MI250 (one of two dies)", 181.05, 181.05),
    ("AMD Instinct MI210", "MI210", 181.0, 181.0),
]


@pytest.mark.parametrize("name,model,bf16,fp16", REPORTED)
def test_reported_names_find_their_dense_peaks(name, model, bf16, fp16):
    peak = gpu_peak(name)
    assert peak is not None and peak.model == model
    assert (peak.bf16_tflops, peak.fp16_tflops) == (bf16, fp16)
    assert peak.has_bf16 is (bf16 is not None)
    assert peak.tflops("bf16") == bf16 and peak.tflops("fp16") == fp16 and peak.tflops("fp32") is None


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 Laptop GPU",
                                  "NVIDIA GeForce GTX 1080", "NVIDIA B200", "AMD Radeon Graphics", "cpu", ""])
def test_unknown_or_ambiguous_names_are_not_guessed(name):
    assert gpu_peak(name) is None
    assert bf16_supported_by_name(name) is None


def test_bf16_support_by_name_for_planning():
    assert bf16_supported_by_name("Tesla V100-SXM2-32GB") is False
    assert bf16_supported_by_name("Tesla T4") is False
    assert bf16_supported_by_name("Tesla P100-PCIE-16GB") is False
    assert bf16_supported_by_name("NVIDIA A100-SXM4-80GB") is True
    assert bf16_supported_by_name("AMD Instinct MI300X") is True


def test_similar_names_do_not_collide():
    assert gpu_peak("NVIDIA L4").model == "L4" and gpu_peak("NVIDIA L40S").model == "L40S"
    assert gpu_peak("NVIDIA A10").model == "A10" and gpu_peak("NVIDIA A100-PCIE-40GB").model == "A100"


def test_the_table_needs_only_the_standard_library():
    code = ("import sys, deepfleet.gpu_peaks; "
            "print(sorted(m for m in ('torch', 'yaml', 'pydantic', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
