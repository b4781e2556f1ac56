"""Training metrics: metrics.jsonl and the experiment trackers on rank 0, heartbeats on every rank, loss.png at the end.

MFU is the step's model FLOPs (`flops.py`, the standard count) over the step time and the sum of
the ranks' peak FLOP/s (`peak.py`). metrics.jsonl starts with a "run" record naming that peak.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfleet.contract import HEARTBEAT_BUSY_STEP, heartbeat_file_name, heartbeat_text

if TYPE_CHECKING:
    from deepfleet.train.tracker_set import Trackers

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
RUN_KIND = "run"          # metrics.jsonl's first record; then "train" and "validation" records


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
    model_flops: float         # training FLOPs of this step, all ranks, by the standard count (flops.py)
    mfu: float                 # model_flops / step_seconds / the ranks' summed peak FLOP/s
    rank_step_seconds: list[float]
    router_aux_loss: float | None = None   # MoE load-balancing loss before its coefficient (already in `loss`)
    recompiles: int | None = None   # train.compile: recompiles so far this attempt (most on any rank); None: eager


def mfu(*, model_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilization: `model_flops` done in `seconds` over `peak_flops` (all ranks' peaks summed)."""
    return model_flops / max(seconds, 1e-9) / peak_flops


def mfu_above_one_warning(value: float, peak_description: str) -> str | None:
    """MFU above 100% means the peak is wrong (too low), never that the run beat the hardware."""
    if value <= 1.0:
        return None
    return (f"warning: MFU {value:.0%} is above 100%, so the peak it divides by ({peak_description}) is too low; "
            "set logging.peak_tflops to the hardware's dense peak per rank")


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
    """Rank 0's sinks: one JSON object per line in metrics.jsonl, and the same records to the trackers
    (`tracker_set.Trackers`: TensorBoard, W&B, MLflow).

    The first line is a "run" record (step 0, so readers indexing every record's step still work)
    with `run_info`: what this attempt's MFU divides by."""

    def __init__(self, output_dir: Path, *, trackers: Trackers | None = None, resume_after_step: int = 0,
                 run_info: dict[str, Any] | None = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE
        kept = []
        if resume_after_step and self.path.is_file():
            # Steps after the checkpoint are trained again: drop their old records, and the old
            # attempt's "run" record (this attempt writes its own).
            kept = [r for r in read_metrics(self.path)
                    if r["step"] <= resume_after_step and r.get("kind") != RUN_KIND]
        self.file = self.path.open("w", encoding="utf-8")
        for record in [{"kind": RUN_KIND, "step": 0, **(run_info or {})}, *kept]:
            self.file.write(json.dumps(record) + "\n")
        self.trackers = trackers

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def write_step(self, metrics: StepMetrics) -> None:
        self.write({"kind": "train", **asdict(metrics)})

    def write_validation(self, *, step: int, val_loss: float) -> None:
        self.write({"kind": "validation", "step": step, "val_loss": val_loss})

    def close(self, final_dir: Path | None = None) -> None:
        """`final_dir`: the saved model, for the trackers to record; None when the run stopped to be resumed."""
        self.file.close()
        if self.trackers is not None:
            self.trackers.finish(final_dir)


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
