"""Where a rank's startup time goes, from its own process start to the end of its first step.

Phases are back to back (each one ends where the next starts), measured on this process's monotonic
clock, so they add up to the rank's whole startup. Only the rank's start time crosses to another
process (the host agent's spawn of the ranks, on the same host and clock), as a unix time.
"""

from __future__ import annotations

import time

from deepfleet.contract import RANK_PHASES, startup_line
from deepfleet.process_start import process_started_monotonic, process_started_wall


class StartupMarks:
    def __init__(self, *, started: float | None = None, started_wall: float | None = None) -> None:
        self.started_wall = process_started_wall() if started_wall is None else started_wall
        self.last = process_started_monotonic() if started is None else started
        self.phases: dict[str, float] = {}

    def end(self, phase: str, *, now: float | None = None) -> None:
        """`phase` ends now; it began where the previous phase ended. A phase ends once only."""
        if phase not in RANK_PHASES:
            raise ValueError(f"unknown rank startup phase {phase!r}")
        if phase in self.phases:
            return
        now = time.monotonic() if now is None else now
        self.phases[phase] = max(0.0, now - self.last)
        self.last = now

    def line(self) -> str:
        return startup_line(self.started_wall, self.phases)
