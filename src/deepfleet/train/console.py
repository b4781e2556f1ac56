"""Rank 0's console: a progress bar and a loss line every few steps. Other ranks print nothing."""

from __future__ import annotations

import math
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deepfleet.train.metrics import StepMetrics

MAX_LOSS_LINES = 20


class TrainingConsole:
    def __init__(self, stream: IO[str] | None, *, total_steps: int, every_steps: int, enabled: bool):
        self.enabled = enabled
        self.console = Console(file=stream, highlight=False, soft_wrap=True) if enabled else None
        self.total_steps = total_steps
        self.line_every = max(every_steps, math.ceil(total_steps / MAX_LOSS_LINES))
        self.progress: Progress | None = None
        self.task = None

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def start(self, first_step: int) -> None:
        if self.console is None:
            return
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=self.total_steps, completed=first_step, loss="-")
        self.progress.start()

    def step(self, metrics: StepMetrics) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=metrics.step, loss=f"{metrics.loss:.4f}")
        if metrics.step % self.line_every == 0 or metrics.step == self.total_steps:
            self.progress.console.print(
                f"step {metrics.step}/{self.total_steps}  loss {metrics.loss:.4f}  lr {metrics.lr:.2e}  "
                f"grad_norm {metrics.grad_norm:.3f}  "
                + (f"router_aux {metrics.router_aux_loss:.4f}  " if metrics.router_aux_loss is not None else "")
                + f"{metrics.tokens_per_second:,.0f} tok/s  "
                f"mfu {metrics.mfu:.1%}  step {metrics.step_seconds:.2f}s")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
