"""When this process started, on the clocks startup timings are measured with.

Standard library only: the host agent, the `deepfleet` command and every rank use it, and each
measures its own startup from its own process start (fork), which the kernel records in
/proc/self/stat. The age is taken against CLOCK_BOOTTIME, the clock that field counts on, to the
kernel's tick (10 ms), rather than /proc/stat's btime, which is whole seconds. Where /proc is not
there, the earliest moment we can see is when this module was first imported.
"""

from __future__ import annotations

import os
import time

_IMPORTED_WALL = time.time()
_IMPORTED_MONOTONIC = time.monotonic()
_STARTTIME_FIELD = 19   # 0-based, after the ")" that ends the command name: field 22 of proc(5)


def process_age_seconds(stat_text: str, *, boottime_now: float, clock_ticks: int) -> float | None:
    """Seconds since the process of this /proc/<pid>/stat text started; None when the text is not one.

    The command name may hold spaces and parentheses: fields are counted after its last ")"."""
    try:
        fields = stat_text.rsplit(")", 1)[1].split()
        started_ticks = int(fields[_STARTTIME_FIELD])
    except (IndexError, ValueError):
        return None
    if clock_ticks <= 0:
        return None
    return max(0.0, boottime_now - started_ticks / clock_ticks)


def own_process_age(*, boottime_now: float | None = None) -> float | None:
    """This process's age in seconds, from /proc (at `boottime_now`, CLOCK_BOOTTIME; default now); None off Linux."""
    try:
        with open("/proc/self/stat", encoding="utf-8", errors="replace") as stat:
            text = stat.read()
        now = time.clock_gettime(time.CLOCK_BOOTTIME) if boottime_now is None else boottime_now
        return process_age_seconds(text, boottime_now=now, clock_ticks=os.sysconf("SC_CLK_TCK"))
    except (OSError, AttributeError, ValueError):
        return None


def process_started_monotonic() -> float:
    """This process's start on time.monotonic()'s scale (the module's import where /proc is missing)."""
    now, age = time.monotonic(), own_process_age()
    return _IMPORTED_MONOTONIC if age is None else min(now - age, _IMPORTED_MONOTONIC)


def process_started_wall() -> float:
    """This process's start as a unix time (the module's import where /proc is missing)."""
    now, age = time.time(), own_process_age()
    return _IMPORTED_WALL if age is None else min(now - age, _IMPORTED_WALL)


def spawn_mark() -> tuple[float | None, float]:
    """(this process's age, now as a unix time), both floored to the kernel tick that /proc counts
    process starts in, from one reading: a spawn marked with it is never after the spawned process's
    start as `process_started_wall` reads it, and age and mark cover the same span."""
    wall = time.time()
    try:
        boottime, ticks = time.clock_gettime(time.CLOCK_BOOTTIME), os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return None, wall
    on_grid = int(boottime * ticks) / ticks
    return own_process_age(boottime_now=on_grid), wall - (boottime - on_grid)
