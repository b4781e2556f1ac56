"""The peak FLOP/s of one rank: the MFU denominator's share, and where it came from.

In order: the recipe's `logging.peak_tflops`; on a GPU, its dense datasheet peak for the run's
precision (`deepfleet.gpu_peaks`, by the name the driver reports); a GPU not in that table (or an
fp32 run on a GPU) measures a 4096^2 matmul in the run's dtype; a CPU measures a 1024^2 fp32 matmul.
The choice is a pure function (`choose_peak`); only `rank_peak` measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from deepfleet.gpu_peaks import gpu_peak
from deepfleet.train.distributed import synchronize

GPU_MATMUL_SIZE = 4096   # enough work per matmul to approach a tensor-core peak
# One CPU core: ~22 ms per fp32 matmul, 89 GFLOP/s vs 92-99 at 512-1536 (2-core Xeon, 2026-12-01);
# so 0.3 s of measurement holds >= 3 matmuls even with two ranks sharing a core.
CPU_MATMUL_SIZE = 1024
MEASURE_SECONDS = 0.3
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class PeakChoice:
    source: Literal["recipe", "table", "measure"]
    tflops: float | None        # the peak per rank when known without measuring (recipe, table); else None
    matmul_dtype: str           # "bf16", "fp16" or "fp32": what to measure (the run's precision)
    matmul_size: int            # side of the square matmul to measure
    description: str            # how the header and metrics.jsonl name it


def choose_peak(*, recipe_peak_tflops: float | None, device_type: str, device_name: str | None,
                precision: str) -> PeakChoice:
    """Where this rank's peak comes from: recipe, GPU table, or a matmul to measure in the run's dtype."""
    size = CPU_MATMUL_SIZE if device_type == "cpu" else GPU_MATMUL_SIZE
    dtype = precision if device_type != "cpu" else "fp32"
    if recipe_peak_tflops:
        return PeakChoice(source="recipe", tflops=recipe_peak_tflops, matmul_dtype=dtype, matmul_size=size,
                          description=f"recipe logging.peak_tflops {recipe_peak_tflops:g} TFLOP/s")
    if device_type == "cpu":
        return PeakChoice(source="measure", tflops=None, matmul_dtype="fp32", matmul_size=size,
                          description=f"measured fp32 matmul {size}x{size} (CPU)")
    entry = gpu_peak(device_name or "")
    tflops = entry.tflops(precision) if entry else None
    if tflops:
        return PeakChoice(source="table", tflops=tflops, matmul_dtype=dtype, matmul_size=size,
                          description=f"table: {device_name} {precision} {tflops:g} TFLOP/s")
    why = "not in the peak table" if entry is None else f"no {precision} figure in the peak table"
    return PeakChoice(source="measure", tflops=None, matmul_dtype=dtype, matmul_size=size,
                      description=f"measured {dtype} matmul {size}x{size} ({device_name or 'GPU'}: {why})")


@dataclass(frozen=True, kw_only=True)
class RankPeak:
    flops: float                # FLOP/s this rank can do at most
    source: str                 # where that figure came from (PeakChoice.description)
    measured: bool              # the figure was measured here (so ranks' figures differ a little)

    @property
    def description(self) -> str:
        return f"{self.source}: {flops_text(self.flops)}" if self.measured else self.source


def rank_peak(choice: PeakChoice, device: torch.device) -> RankPeak:
    """The chosen peak, measuring the matmul when the choice asks for it."""
    if choice.tflops is not None:
        return RankPeak(flops=choice.tflops * 1e12, source=choice.description, measured=False)
    flops = measure_matmul_flops(device, dtype=MATMUL_DTYPES[choice.matmul_dtype], size=choice.matmul_size)
    return RankPeak(flops=flops, source=choice.description, measured=True)


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def measure_matmul_flops(device: torch.device, *, dtype: torch.dtype, size: int,
                         seconds: float = MEASURE_SECONDS) -> float:
    """Achieved FLOP/s of square matmuls on `device`, after a warm-up, timed between synchronizations."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    synchronize(device)
    count, batch, start = 0, 1, time.perf_counter()
    while True:
        for _ in range(batch):   # GPU kernels queue up; synchronizing after each would time the gaps
            torch.matmul(a, b)
        synchronize(device)
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 3:
            return 2.0 * size ** 3 * count / elapsed
        batch = min(2 * batch, 64)


def flops_text(flops: float, low: float | None = None) -> str:
    """"989.4 TFLOP/s", or a range "137.1 to 146.7 GFLOP/s" from `low`."""
    scale, unit = (1e12, "TFLOP/s") if flops >= 1e12 else (1e9, "GFLOP/s")
    start = "" if low is None else f"{low / scale:,.1f} to "
    return f"{start}{flops / scale:,.1f} {unit}"


def peak_summary(peak: RankPeak, rank_flops: Sequence[float]) -> str:
    """How the header and metrics.jsonl name the peak: rank 0's, or the ranks' range when they differ."""
    low, high = min(rank_flops), max(rank_flops)
    if high <= low * 1.005:
        return peak.description
    if peak.measured:
        return f"{peak.source}: {flops_text(high, low)} per rank"
    return f"{peak.description} on rank 0; {flops_text(high, low)} over the ranks"
