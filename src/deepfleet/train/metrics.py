"""Training metrics: metrics.jsonl and TensorBoard on rank 0, heartbeats on every rank, loss.png at the end.

MFU is 6 x parameters x tokens/s over the peak FLOP/s of the ranks; the peak comes from the recipe
(`logging.peak_tflops`, per rank) or from a short matmul benchmark when unset.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deepfleet.contract import HEARTBEAT_BUSY_STEP, heartbeat_file_name, heartbeat_text

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    step: int                  # optimizer steps done (1-based after the first step)
    epoch: int
    loss: float                # mean over accumulation micro batches and ranks
    lr: float
    grad_norm: float
    tokens: int                # real (non-pad) tokens this step, all ranks
    step_seconds: float        # slowest rank
    tokens_per_second: float
    mfu: float
    rank_step_seconds: list[float]
    router_aux_loss: float | None = None   # MoE load-balancing loss before its coefficient (already in `loss`)


def model_flops_per_second(*, n_params: int, tokens_per_second: float) -> float:
    """Training FLOP/s by the usual 6N rule (forward 2N, backward 4N per token)."""
    return 6.0 * n_params * tokens_per_second


def mfu(*, n_params: int, tokens_per_second: float, peak_flops_per_rank: float, world_size: int) -> float:
    return model_flops_per_second(n_params=n_params, tokens_per_second=tokens_per_second) / (
        peak_flops_per_rank * world_size)


def measure_peak_flops(device: torch.device, *, size: int = 512, seconds: float = 0.3,
                       dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul FLOP/s of one rank on `device`, from a short benchmark."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        torch.matmul(a, b)
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2.0 * size ** 3 * count / max(elapsed, 1e-9)


class Heartbeat:
    """Writes `<step> <unix time>` to $DEEPFLEET_HEARTBEAT_DIR/rank-<RANK>, for the launcher's supervisor."""

    def __init__(self, directory: str | None, rank: int, every_seconds: float):
        self.path = Path(directory) / heartbeat_file_name(rank) if directory else None
        self.every_seconds = every_seconds
        self.last = 0.0

    def busy(self) -> None:
        """Step -1 while a rank starts, saves or validates: the supervisor's longer startup timeout applies,
        so a save of a large model is not mistaken for a hang."""
        self.beat(HEARTBEAT_BUSY_STEP, force=True)

    def beat(self, step: int, *, force: bool = False) -> None:
        now = time.time()
        if self.path is None or (not force and now - self.last < self.every_seconds):
            return
        self.last = now
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(heartbeat_text(step, now))
        os.replace(tmp, self.path)


class MetricsWriter:
    """Rank 0's sinks: one JSON object per line in metrics.jsonl, and TensorBoard scalars."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_after_step: int = 0):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE
        kept = []
        if resume_after_step and self.path.is_file():
            # Steps after the checkpoint are trained again: drop their old records.
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_after_step]
        self.file = self.path.open("w", encoding="utf-8")
        for record in kept:
            self.file.write(json.dumps(record) + "\n")
        self.board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(output_dir / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.board.add_scalar(f"train/{key}" if not key.startswith("val") else key, value, step)

    def write_step(self, metrics: StepMetrics) -> None:
        self.write({"kind": "train", **asdict(metrics)})

    def write_validation(self, *, step: int, val_loss: float) -> None:
        self.write({"kind": "validation", "step": step, "val_loss": val_loss})

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """loss.png: training loss per step, validation loss points when present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    validation = [r for r in records if r.get("kind") == "validation"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if validation:
        axis.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "o-", label="validation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
