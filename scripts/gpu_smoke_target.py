"""What the GPU smoke test runs on (device, ranks, precision, sizes, tolerances) and how it reports.

Imports torch only, so the skip on a machine without a GPU stays fast.
"""

from __future__ import annotations

import importlib.util
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCRIPTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class MfuModelSize:
    """A Llama config big enough for MFU to mean something on the device, trained for a few steps."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    max_length: int     # tokens per packed row
    micro_batch: int    # rows per rank per step
    steps: int


# ~85M parameters: a GPU does real work per step, so the figure is not launch overhead.
GPU_MFU_MODEL = MfuModelSize(hidden=768, intermediate=2048, layers=12, heads=12, max_length=512, micro_batch=8,
                             steps=16)
# ~3M parameters: a few seconds per run on 2 shared CPU cores.
CPU_MFU_MODEL = MfuModelSize(hidden=256, intermediate=768, layers=4, heads=4, max_length=256, micro_batch=4,
                             steps=8)


@dataclass(frozen=True, kw_only=True)
class Target:
    device_type: str            # "cuda" or "cpu"
    device: str                 # where in-process models go: "cuda:0" or "cpu"
    ranks: int
    precision: str              # the recipes' precision: bf16, fp16 or fp32
    dtype: torch.dtype          # packing checks, and what `generate` should load in
    flash_installed: bool
    hardware: str               # for the header line
    mfu_model: MfuModelSize

    @property
    def half(self) -> bool:
        return self.dtype != torch.float32

    @property
    def packing_tolerance(self) -> float:
        # Measured on CPU in bf16 (sdpa packed vs alone): 0.004-0.006 on logits of size ~1; fp32: < 1e-6.
        return 0.05 if self.half else 1e-4

    @property
    def export_tolerance(self) -> float:
        """Relative to the largest |logit|: both dirs load in the same dtype, so they should agree to rounding."""
        return 0.02 if self.half else 1e-5


CONTROL_MARGIN = 4.0    # the negative control must differ by this many tolerances, or the check cannot fail


def no_gpu_reason() -> str | None:
    """Why there is no CUDA GPU to test on, or None when there is one."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"torch build {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but cuda is not available"
    if torch.cuda.device_count() == 0:
        return "device count is 0"
    return None


def cuda_target() -> Target:
    count = torch.cuda.device_count()
    bf16 = torch.cuda.is_bf16_supported()
    return Target(device_type="cuda", device="cuda:0", ranks=min(2, count), precision="bf16" if bf16 else "fp16",
                  dtype=torch.bfloat16 if bf16 else torch.float16,
                  flash_installed=importlib.util.find_spec("flash_attn") is not None,
                  hardware=f"{count} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
                  mfu_model=GPU_MFU_MODEL)


def cpu_target() -> Target:
    """Development only: the same checks on CPU in fp32, so the script itself can be tested anywhere."""
    return Target(device_type="cpu", device="cpu", ranks=2, precision="fp32", dtype=torch.float32,
                  flash_installed=False, hardware=f"CPU, torch {torch.__version__}", mfu_model=CPU_MFU_MODEL)


class CheckFailed(Exception):
    """A check ran and its figures are out of bounds; the message carries them."""


@dataclass
class Report:
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, name: str, run: Callable[[], str]) -> None:
        """Run one check: it returns its figures, or raises. Print one `ok:` or `FAIL:` line either way."""
        try:
            figures = run()
        except CheckFailed as exc:
            self._fail(name, str(exc))
        except Exception as exc:   # a smoke test reports every failure and goes on to the next check
            message = (str(exc).splitlines() or [""])[0]
            self._fail(name, f"{type(exc).__name__}: {message} (at {_smoke_frame(exc)})")
        else:
            self.passed += 1
            print(f"ok: {name} {figures}", flush=True)

    def _fail(self, name: str, detail: str) -> None:
        self.failed.append(name)
        print(f"FAIL: {name} {detail}", flush=True)


def _smoke_frame(exc: Exception) -> str:
    """file:line of the innermost frame in these scripts (a library's own frame says little)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if Path(frame.filename).parent == SCRIPTS_DIR] or frames
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"
