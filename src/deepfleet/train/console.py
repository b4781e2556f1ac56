"""Rank 0's console: a line every logging interval (and a progress bar on a terminal). Other ranks print nothing.

Under the launcher rank 0's stdout is a pipe to the head, where a progress bar would only appear at
exit; there each logging interval prints one line (at most one per 2 s): step, loss, tokens/s, the
slowest rank's step time and host, and the time left.
"""

from __future__ import annotations

import math
import time
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deepfleet.train.metrics import StepMetrics

MAX_LOSS_LINES = 20   # on a terminal, where the bar shows progress, lines are only milestones
MIN_LINE_SECONDS = 2.0  # without a terminal, a line per logging interval, but not more often than this


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainingConsole:
    def __init__(self, stream: IO[str] | None, *, total_steps: int, every_steps: int, enabled: bool,
                 rank_hosts: list[str] | None = None):
        self.console = Console(file=stream, highlight=False, soft_wrap=True) if enabled else None
        self.live = self.console is not None and self.console.is_terminal
        self.total_steps = total_steps
        self.line_every = max(every_steps, math.ceil(total_steps / MAX_LOSS_LINES)) if self.live else every_steps
        self.rank_hosts = rank_hosts or []
        self.progress: Progress | None = None
        self.task = None
        self.started: tuple[float, int] | None = None   # (time, step) when training started
        self.last_line = -math.inf

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False)

    def start(self, first_step: int) -> None:
        if self.console is None:
            return
        self.started = (time.monotonic(), first_step)
        if not self.live:
            return
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=self.total_steps, completed=first_step, loss="-")
        self.progress.start()

    def step(self, metrics: StepMetrics) -> None:
        if self.console is None:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=metrics.step, loss=f"{metrics.loss:.4f}")
        now = time.monotonic()
        due = metrics.step % self.line_every == 0 and (self.live or now - self.last_line >= MIN_LINE_SECONDS)
        if due or metrics.step == self.total_steps:
            self.last_line = now
            (self.progress.console if self.progress else self.console).print(self.line(metrics), markup=False)

    def line(self, metrics: StepMetrics) -> str:
        text = (f"step {metrics.step}/{self.total_steps}  loss {metrics.loss:.4f}  lr {metrics.lr:.2e}  "
                f"grad_norm {metrics.grad_norm:.3f}  ")
        if metrics.router_aux_loss is not None:
            text += f"router_aux {metrics.router_aux_loss:.4f}  "
        text += f"{metrics.tokens_per_second:,.0f} tok/s  mfu {metrics.mfu:.1%}  step {metrics.step_seconds:.2f}s"
        if len(metrics.rank_step_seconds) > 1:
            slowest = max(range(len(metrics.rank_step_seconds)), key=metrics.rank_step_seconds.__getitem__)
            host = self.rank_hosts[slowest] if slowest < len(self.rank_hosts) else "?"
            text += f" (slowest: rank {slowest} on {host})"
        if self.started is not None and metrics.step > self.started[1]:
            per_step = (time.monotonic() - self.started[0]) / (metrics.step - self.started[1])
            text += f"  eta {duration(per_step * (self.total_steps - metrics.step))}"
        return text

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
