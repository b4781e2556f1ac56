"""Preemption: on the configured signal a rank finishes its step; then every rank checkpoints and exits.

The request is only noted in the handler. The loop shares it with the other ranks through the
per-step metrics all-reduce, so a signal to any one rank stops all of them at the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    def __init__(self, signal_name: str):
        self.requested = False
        self.signum = getattr(signal, signal_name)
        self.previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)


class Preempted(Exception):
    """Raised after the preemption checkpoint is complete; the rank exits with `contract.EXIT_PREEMPTED`."""

    def __init__(self, step: int, checkpoint: Path):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
