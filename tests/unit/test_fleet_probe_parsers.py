"""The probe's parsers on recorded tool output: nvidia-smi, rocm-smi, nvcc, DeepSpeed's install record."""

import subprocess

from deepfleet.fleet import remote_probe_build, remote_probe_gpus
from deepfleet.fleet.remote_probe_build import parse_install_record, parse_nvcc_version
from deepfleet.fleet.remote_probe_gpus import parse_nvidia_smi, parse_rocm_smi

GIB = 1 << 30
H100_SMI = "NVIDIA H100 80GB HBM3, 81559, 9.0\nNVIDIA H100 80GB HBM3, 81559, 9.0\n"
ROCM_PRODUCT = """{"card0": {"Card series": "AMD Instinct MI300X", "Card model": "0x74a1", "Card vendor":
 "Advanced Micro Devices, Inc. [AMD/ATI]", "Card SKU": "M3000100", "GFX Version": "gfx942"},
 "card10": {"Card series": "", "Card model": "0x74a1", "Card SKU": "M3000100"},
 "card2": {"Card series": "AMD Instinct MI300X", "Card model": "0x74a1"}}"""
ROCM_MEMORY = """{"card0": {"VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "299606016"},
 "card2": {"VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "299606016"},
 "system": {"Driver version": "6.8.5"}}"""
NVCC = "nvcc: NVIDIA (R) Cuda compiler driver\nBuilt on Tue_Feb_27\nCuda compilation tools, release 12.4, V12.4.99\n"
RECORD = ("version='0.19.8'\ngit_hash='unknown'\ngit_branch='unknown'\n"
          "installed_ops={'async_io': False, 'cpu_adam': 1, 'fused_adam': True, 'pin_memory': False}\n"
          "accelerator_name='cuda'\n"
          "torch_info={'version': '2.13', 'bf16_support': True, 'cuda_version': '12.8', 'nccl_version': '2.27', "
          "'hip_version': '0.0'}\n")


def test_nvidia_smi_gives_names_memory_and_compute_capability_per_gpu():
    assert parse_nvidia_smi(H100_SMI) == {"models": ["NVIDIA H100 80GB HBM3"] * 2, "memory_bytes": [81559 << 20] * 2,
                                          "compute_capability": ["9.0", "9.0"]}
    odd = parse_nvidia_smi("NVIDIA GH200 480GB, [N/A], 9.0\nTesla V100-SXM2-32GB, 32510\n")
    assert odd["memory_bytes"] == [None, 32510 << 20] and odd["compute_capability"] == ["9.0", None]
    old = parse_nvidia_smi("Tesla V100-SXM2-32GB, 32510\n", with_compute_cap=False)
    assert old == {"models": ["Tesla V100-SXM2-32GB"], "memory_bytes": [32510 << 20], "compute_capability": [None]}


def test_old_driver_without_compute_cap_falls_back_to_name_and_memory(monkeypatch):
    def smi(argv, **kwargs):
        if "compute_cap" in argv[1]:
            return subprocess.CompletedProcess(argv, 2, 'Field "compute_cap" is not a valid field to query.\n\n', "")
        return subprocess.CompletedProcess(argv, 0, "Tesla V100-SXM2-32GB, 32510\n", "")
    monkeypatch.setattr(remote_probe_gpus.subprocess, "run", smi)
    assert remote_probe_gpus.nvidia_gpus()["memory_bytes"] == [32510 << 20]


def test_rocm_smi_cards_in_index_order_with_names_and_memory():
    gpus = parse_rocm_smi(ROCM_PRODUCT, ROCM_MEMORY)
    assert gpus["models"] == ["AMD Instinct MI300X", "AMD Instinct MI300X", "0x74a1"]   # card0, card2, card10
    assert gpus["memory_bytes"] == [205822885888, 205822885888, None]
    assert gpus["compute_capability"] == [None] * 3
    assert parse_rocm_smi("not json", "") == {"models": [], "memory_bytes": [], "compute_capability": []}


def test_nvcc_version_and_deepspeed_install_record():
    assert parse_nvcc_version(NVCC) == "12.4" and parse_nvcc_version("") is None
    assert parse_install_record(RECORD) == {"prebuilt": ["cpu_adam", "fused_adam"], "accelerator": "cuda",
                                            "torch": "2.13", "cuda": "12.8", "hip": "0.0"}


def test_install_record_of_the_installed_deepspeed_matches_what_deepspeed_reads():
    from deepspeed.git_version_info import accelerator_name, installed_ops

    import deepspeed
    record = remote_probe_build.deepspeed_ops_facts(deepspeed.__file__)
    assert record["prebuilt"] == sorted(op for op, built in installed_ops.items() if built)
    assert record["accelerator"] == accelerator_name


def test_cuda_home_is_found_as_torch_finds_it(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import _find_cuda_home

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.6, V12.6.20'\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert remote_probe_build.find_cuda_home() == _find_cuda_home() == str(tmp_path)
    assert remote_probe_build.nvcc_facts(str(tmp_path)) == {"path": str(tmp_path / "bin" / "nvcc"), "version": "12.6"}
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert remote_probe_build.find_cuda_home() == _find_cuda_home() == str(tmp_path)
