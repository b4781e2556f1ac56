"""What `train --slurm` and `train --pbs` ask a batch scheduler for, and what both scripts share:
the training runs in the background so the batch shell can hand it the scheduler's SIGTERM (a
foreground child would not get it), and the script exits with the training's code."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from deepfleet.errors import DeepfleetError, Problem

STARTUP_ALLOWANCE = 300        # seconds a job may need to start training before a checkpoint is possible
Submitted = TypeVar("Submitted")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True, kw_only=True)
class BatchRequest:
    """What the job asks the scheduler for; None leaves it to the site's defaults."""

    nodes: int = 1
    gpus_per_node: int = 0            # 0: CPU nodes
    partition: str | None = None      # SLURM partition, PBS queue
    time: str | None = None           # time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    account: str | None = None
    grace_seconds: int = 120          # SIGTERM this long before the time limit: time to write a checkpoint


def options_given(request: BatchRequest) -> list[str]:
    """The scheduler options set away from their defaults, as the command line names them."""
    return [name for name, given in (("--nodes", request.nodes != 1), ("--gpus-per-node", request.gpus_per_node),
                                     ("--partition", request.partition), ("--time", request.time),
                                     ("--account", request.account)) if given]


def time_limit_seconds(text: str) -> int:
    """SLURM's time limit formats (`sbatch --time`), in seconds; PBS's HH:MM:SS is one of them."""
    match = _TIME.match(text.strip())
    if not match:
        raise DeepfleetError(f"not a time limit: {text!r}", where=f"--time {text}",
                             fix="use MM, HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00")
    days, first, second, third = match.groups()
    if days is not None:   # D-HH[:MM[:SS]]
        return ((int(days) * 24 + int(first)) * 60 + int(second or 0)) * 60 + int(third or 0)
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)   # MM[:SS]


def time_problems(request: BatchRequest) -> list[Problem]:
    """A time limit too short to reach the first checkpoint before the SIGTERM `grace_seconds` before it."""
    if request.time is None:
        return []
    limit, needed = time_limit_seconds(request.time), request.grace_seconds + STARTUP_ALLOWANCE
    if limit >= needed:
        return []
    return [Problem(where=f"--time {request.time}",
                    what=f"{limit} s leaves under {STARTUP_ALLOWANCE} s to start training before the checkpoint "
                         f"signal {request.grace_seconds} s before the end, so no checkpoint would be written",
                    fix=f"--time {-(-needed // 60)} (minutes) or more")]


def in_job_train_argv(train_args: Sequence[str]) -> list[str]:
    """`deepfleet train ...` as the job script runs it inside the allocation, with this Python."""
    return [sys.executable, "-m", "deepfleet.cli.app", "train", *train_args]


def training_lines(train_argv: Sequence[str], *, term_after: int | None = None) -> list[str]:
    """The script's body: the training in the background, SIGTERM forwarded, its exit code returned.
    `term_after`: also send the training SIGTERM itself after this many seconds (for a scheduler
    that gives no warning before its time limit)."""
    return background_lines(shlex.join(train_argv), term_after=term_after)


def background_lines(command: str, *, term_after: int | None = None, before_exit: Sequence[str] = ()) -> list[str]:
    """training_lines for a command already written as shell text (e.g. `"$@"`); `before_exit`: lines
    run once the command ended, with its exit code in $code."""
    timer = [f"( trap 'kill \"$sleeper\" 2>/dev/null; exit 0' TERM; sleep {term_after} & sleeper=$!; "
             'wait "$sleeper" && kill -TERM "$child" 2>/dev/null ) & timer=$!'] if term_after else []
    return [
        f"{command} &",
        "child=$!",
        *timer,
        "trap 'kill -TERM \"$child\" 2>/dev/null' TERM",
        'wait "$child"; code=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done   # wait returns early on a trap',
        *(['kill "$timer" 2>/dev/null'] if timer else []),
        *before_exit,
        'exit "$code"']


def write_and_submit(text: str, script: Path, submit: Callable[[Path], Submitted]) -> Submitted:
    """Write the script (and its directories), submit it; on a refusal remove what was created."""
    created = [d for d in reversed(script.parents) if not d.exists()]   # every missing level, e.g. runs/ too
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    try:
        return submit(script)
    except DeepfleetError:
        script.unlink()
        for directory in reversed(created):
            directory.rmdir()
        raise
