"""This machine's accelerators and memory, as the head sees them (torch is imported only when asked)."""

from __future__ import annotations

import os


def gpu_count() -> int:
    """CUDA GPUs torch can use here (honours CUDA_VISIBLE_DEVICES); 0 without CUDA."""
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
