"""What the head (launcher, host agent, supervisor) and each training rank agree on.

Standard library only: the host agent imports it on every host, where it must start fast and
must not need torch. The head never imports `deepfleet.train`, and the ranks never import
`deepfleet.launch`; everything one side writes and the other reads is named here once.
"""

from __future__ import annotations

import json
import re

# The rank program the host agents run on every host.
TRAIN_MODULE = "deepfleet.train"

# Environment the head sets for the ranks.
RECIPE_ENV = "DEEPFLEET_RECIPE"              # the resolved recipe as JSON (hosts share no files)
HEARTBEAT_DIR_ENV = "DEEPFLEET_HEARTBEAT_DIR"  # where each rank rewrites its heartbeat file
JOB_ID_ENV = "DEEPFLEET_JOB_ID"              # marks every process of one job on one host
PREPARED_DATA_ENV = "DEEPFLEET_PREPARED_DATA"  # the prepared-data entry the head built; ranks map it

# Exit codes a rank (or the agent) ends with, and what the head makes of them.
EXIT_BAD_INPUT = 2          # a DeepfleetError: the same input fails again, never restarted
EXIT_PREEMPTED = 75         # "resumable": a checkpoint was written; run the same command again
EXIT_LIFELINE_LOST = 76     # the agent lost the head and stopped its host (not 75: nothing was saved)

# Heartbeats: rank-<RANK> holds "<step> <unix time>", replaced atomically through a temporary name.
HEARTBEAT_BUSY_STEP = -1            # starting, saving or validating: the longer startup timeout applies
_HEARTBEAT_FILE = re.compile(r"rank-(\d+)")


def heartbeat_file_name(rank: int) -> str:
    return f"rank-{rank}"


def heartbeat_rank(file_name: str) -> str | None:
    """The rank a heartbeat file belongs to; None for anything else in the dir (temporary files)."""
    match = _HEARTBEAT_FILE.fullmatch(file_name)
    return match.group(1) if match else None


def heartbeat_text(step: int, when: float) -> str:
    return f"{step} {when:.3f}\n"


def heartbeat_step(text: str) -> int:
    """The step in a heartbeat file's text (ValueError/IndexError when it is not one)."""
    return int(text.split()[0])


# Lines on a rank's output. The host agent prefixes each line with the global rank ("[3]:...", as torchrun does).
def rank_prefix(rank: int) -> str:
    return f"[{rank}]:"


RANK_LINE = re.compile(r"^\[(\d+)\]:")
ERROR_LINE_PREFIX = "error: "           # a rank's DeepfleetError.render()
PREEMPTED_LINE_PREFIX = "preempted: "   # after the preemption checkpoint is complete
RANK_ERROR_LINE = re.compile(r"^\[(\d+)\]:(" + re.escape(ERROR_LINE_PREFIX) + r".*)$")
RANK_PREEMPTED_LINE = re.compile(r"^\[\d+\]:" + re.escape(PREEMPTED_LINE_PREFIX))


_PREEMPTED_AT = re.compile(r"stopped at step (\d+); checkpoint (.+)$")


def preempted_line(step: int, checkpoint: str) -> str:
    return f"{PREEMPTED_LINE_PREFIX}stopped at step {step}; checkpoint {checkpoint}"


def preempted_at(line: str) -> tuple[int, str] | None:
    """(step, checkpoint) from a (rank-prefixed) preempted line."""
    found = _PREEMPTED_AT.search(line)
    return (int(found.group(1)), found.group(2)) if found else None


# The host agent's reports to the head: one JSON object per line after this prefix.
AGENT_EVENT_PREFIX = "@@deepfleet "


# Rank 0's startup timings, printed once after its first step of each attempt (see
# launch/startup_timings.py): "startup: {"started_at": unix time of the rank process's start,
# "phases": {name: seconds}}". Phases run back to back from the process start, in this order;
# one a rank did not reach is absent.
STARTUP_LINE_PREFIX = "startup: "
RANK_PHASES = ("imports", "rendezvous", "data", "model", "deepspeed_init", "setup", "first_step")
RANK_STARTUP_LINE = re.compile(r"^\[(\d+)\]:" + re.escape(STARTUP_LINE_PREFIX) + r"(.*)$")


def startup_line(started_at: float, phases: dict[str, float]) -> str:
    return STARTUP_LINE_PREFIX + json.dumps({"started_at": round(started_at, 3),
                                             "phases": {name: round(seconds, 3) for name, seconds in phases.items()}})
