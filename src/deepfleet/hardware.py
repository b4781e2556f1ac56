"""This machine's accelerators and memory, as the head sees them (torch is imported only when asked)."""

from __future__ import annotations

import os


NVIDIA_GPUS_DIR = "/proc/driver/nvidia/gpus"   # one entry per GPU the NVIDIA driver found
OTHER_GPU_DEVICES = ("/dev/kfd", "/dev/dxg")     # ROCm; WSL2's GPU passthrough


def gpu_driver_present(nvidia_dir: str = NVIDIA_GPUS_DIR, devices: tuple[str, ...] = OTHER_GPU_DEVICES) -> bool:
    """Whether a GPU driver is loaded here (as the hosts' probe decides): without one torch sees no GPU."""
    return (os.path.isdir(nvidia_dir) and bool(os.listdir(nvidia_dir))) or any(map(os.path.exists, devices))


def gpu_count() -> int:
    """CUDA GPUs torch can use here (honours CUDA_VISIBLE_DEVICES); 0 without CUDA. Without a GPU
    driver torch is not imported: the head would spend seconds to learn there is no GPU."""
    if not gpu_driver_present():
        return 0
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_memory_bytes() -> int:
    """Memory of GPU 0 (callers check gpu_count() first)."""
    import torch
    return torch.cuda.get_device_properties(0).total_memory


def gpu_models() -> tuple[str, ...]:
    """Distinct names of the visible GPUs (callers check gpu_count() first)."""
    import torch
    return tuple(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}))


def gpu_bf16_supported() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
