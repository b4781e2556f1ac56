"""Dense 16-bit tensor peaks of the GPUs deepfleet knows, looked up by the name the driver reports.

Standard library only: `train/` (the MFU denominator) and `fleet/` (planning) both import it.

    gpu_peak("NVIDIA H100 80GB HBM3")        -> GpuPeak(model="H100 SXM", bf16_tflops=989.4, fp16_tflops=989.4)
    bf16_supported_by_name("Tesla V100-SXM2-32GB") -> False
    gpu_peak("some other GPU")               -> None  (callers measure instead)

Names are what `torch.cuda.get_device_name()` and `nvidia-smi` report (`rocm-smi` / libdrm's
amdgpu.ids on AMD). Every figure is, per device as torch sees it:
- dense: NVIDIA's datasheets print the 2:4-sparse figure first; these are half of it;
- with fp32 accumulation, which PyTorch's matmuls use (GeForce cards run fp16 accumulation twice
  as fast; that figure does not apply to training);
- per device: an MI250/MI250X package is two devices (GCDs) to torch, so half the package figure.
A name matching no entry gives None rather than a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GpuPeak:
    model: str                    # the table's name for the matched GPU, e.g. "H100 SXM"
    fp16_tflops: float            # dense fp16 tensor peak per device, TFLOP/s (fp32 accumulation)
    bf16_tflops: float | None     # the same in bf16; None: the GPU has no bf16 tensor math (V100, T4, P100)

    @property
    def has_bf16(self) -> bool:
        return self.bf16_tflops is not None

    def tflops(self, precision: str) -> float | None:
        """The peak for a run's precision ("bf16" or "fp16"); None for fp32 or bf16 on a GPU without it."""
        return {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops}.get(precision)


@dataclass(frozen=True, kw_only=True)
class _Rule:
    tokens: frozenset[str]                 # every one must be a token of the name
    peak: GpuPeak
    unless: frozenset[str] = frozenset()   # none of these may be


def _rule(tokens: str, model: str, tflops: float, *, bf16: bool = True, unless: str = "") -> _Rule:
    """Every GPU here with bf16 tensor math has the same bf16 and fp16 peak."""
    return _Rule(tokens=frozenset(tokens.split()), unless=frozenset(unless.split()),
                 peak=GpuPeak(model=model, fp16_tflops=tflops, bf16_tflops=tflops if bf16 else None))


# Most specific first: the first rule whose tokens all appear in the name wins.
_RULES: tuple[_Rule, ...] = (
    # NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 / NVL 1,671 sparse bf16 TFLOPS; the Hopper
    # whitepaper's dense SXM figure is 989.4. "NVIDIA H100 80GB HBM3" is the SXM part.
    _rule("h100 nvl", "H100 NVL", 835.5),
    _rule("h100 pcie", "H100 PCIe", 756.5),
    _rule("h100", "H100 SXM", 989.4),
    # H200 / GH200 datasheets: 1,979 sparse (SXM, Grace Hopper), 1,671 sparse (NVL).
    _rule("h200 nvl", "H200 NVL", 835.5),
    _rule("gh200", "GH200", 989.4),
    _rule("h200", "H200 SXM", 989.4),
    # A100 datasheet: 312 dense bf16/fp16 for SXM4 and PCIe, 40 and 80 GB alike.
    _rule("a100", "A100", 312.0),
    _rule("a800", "A800", 312.0),
    # L40S / L40 datasheets: 362.05 / 181.05 dense (733 / 362.1 sparse). L4 datasheet: 242 sparse.
    _rule("l40s", "L40S", 362.05),
    _rule("l40", "L40", 181.05),
    _rule("l4", "L4", 121.0),
    # A40 datasheet: bf16 with fp32 accumulate 149.7 dense. A10 datasheet: 125 dense (250 sparse).
    # The A10G (AWS G5) has no NVIDIA datasheet; AWS and Baseten cite 70 dense fp16 tensor TFLOPS.
    _rule("a40", "A40", 149.7),
    _rule("a10g", "A10G", 70.0),
    _rule("a10", "A10", 125.0),
    # Ada whitepaper: RTX 4090 165.2 dense fp16/bf16 with fp32 accumulate (330.3 with fp16
    # accumulate). GA102 whitepaper: RTX 3090 71 with fp32 accumulate (142 with fp16 accumulate).
    # Laptop parts and the 3090 Ti differ, so they are left to measurement.
    _rule("rtx 4090", "RTX 4090", 165.2, unless="laptop"),
    _rule("rtx 3090", "RTX 3090", 71.0, unless="ti laptop"),
    # No bf16 before Ampere. V100 datasheet: 125 (SXM2), 112 (PCIe), V100S 130 tensor TFLOPS;
    # T4 datasheet: 65 mixed fp16/fp32; P100 (no tensor cores): 21.2 (SXM2) / 18.7 (PCIe) fp16.
    _rule("v100s", "V100S", 130.0, bf16=False),
    _rule("v100 pcie", "V100 PCIe", 112.0, bf16=False),
    _rule("v100", "V100 SXM2", 125.0, bf16=False),
    _rule("t4", "T4", 65.0, bf16=False),
    _rule("p100 pcie", "P100 PCIe", 18.7, bf16=False),
    _rule("p100", "P100 SXM2", 21.2, bf16=False),
    # AMD spec sheets (peak fp16/bf16 matrix): MI300X 1,307.4; MI250X 383.0 and MI250 362.1 per
    # two-die package, so 191.5 and 181.05 per device; MI210 181.0. libdrm names one MI250 part
    # "AMD Instinct MI250X / MI250": it gets the higher MI250X figure, so MFU is never overstated.
    _rule("mi300x", "MI300X", 1307.4),
    _rule("mi250x", "MI250X (one of two dies)", 191.5),
    _rule("mi250", "MI250 (one of two dies)", 181.05),
    _rule("mi210", "MI210", 181.0),
)


def name_tokens(device_name: str) -> frozenset[str]:
    """Lowercase alphanumeric words: "NVIDIA A100-SXM4-80GB" -> {"nvidia", "a100", "sxm4", "80gb"}."""
    return frozenset(re.findall(r"[a-z0-9]+", device_name.lower()))


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The dense 16-bit peaks of the GPU with this reported name, or None when the table has no entry."""
    tokens = name_tokens(device_name)
    for rule in _RULES:
        if rule.tokens <= tokens and not rule.unless & tokens:
            return rule.peak
    return None


def bf16_supported_by_name(device_name: str) -> bool | None:
    """Whether the GPU with this reported name has bf16 tensor math; None when the name is not in the table."""
    peak = gpu_peak(device_name)
    return None if peak is None else peak.has_bf16
