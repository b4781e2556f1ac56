"""Where the time from `deepfleet train` to the first training step goes, phase by phase.

Every figure is a duration measured on one clock; hosts' clocks may differ, so no figure subtracts
one host's time from another's:
- the command's own phases (CLI import, planning, data, launch preparation) and the total, on the
  head's monotonic clock, from the command's process start (a restart: from its launch);
- agent start: the host agent's process start to its spawn of the ranks, measured by the agent;
- connect: the head's spawn of the agent command to the agent's first event, less the agent's own
  figure (ssh or srun, both ways; None when the agent runs here without either);
- rank spawn: the agent's spawn of the ranks to rank 0's process start, both on that host's clock;
- the rank's phases, back to back inside rank 0 from its process start to the end of its first step.
What is left of the total (output passing back through the agent and ssh, small gaps) is "other".
Process starts are known to the kernel's tick (10 ms): the agent's may fall in the tick before the
head's spawn of it, so "other" can be below zero by up to one tick. Figures are not clamped at zero:
a negative one beyond that would be a measuring error, and must show.
Phases of rank 0's host; a phase not reached is None and shown as "-".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deepfleet.contract import RANK_PHASES

STARTUP_FILE = "startup.json"


@dataclass(frozen=True, kw_only=True)
class HeadStartup:
    """The `deepfleet` command's phases before the launch, on the head's monotonic clock."""
    process_started: float    # the command's process start (time.monotonic() scale)
    cli_import: float         # process start -> the train command's entry (Python, imports, argument parsing)
    planning: float           # recipe, fleet, the hosts' probe over ssh, the plan
    data: float               # the data prepared (or found prepared) on the head
    ended: float              # when the last of these ended (time.monotonic() scale)


class HeadClock:
    """Marks the command's phases as they end: `HeadClock()` at the command's entry, then `end(...)`."""

    def __init__(self, *, process_started: float, entered: float) -> None:
        self.process_started, self.entered, self.last = process_started, entered, entered
        self.phases: dict[str, float] = {}

    def end(self, phase: str, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.phases[phase] = max(0.0, now - self.last)
        self.last = now

    def startup(self) -> HeadStartup:
        return HeadStartup(process_started=self.process_started,
                           cli_import=max(0.0, self.entered - self.process_started),
                           planning=self.phases.get("planning", 0.0), data=self.phases.get("data", 0.0),
                           ended=self.last)


@dataclass(kw_only=True)
class HostLaunch:
    """One host's launch as the head saw it (head monotonic clock) and as its agent reported it."""
    transport: str                          # "ssh", "srun" or "local" (no connection to make)
    spawned: float | None = None            # the head started the agent command
    first_event: float | None = None        # the agent's first event reached the head
    agent_seconds: float | None = None      # the agent's process start -> its spawn of the ranks (its clock)
    ranks_spawned_at: float | None = None   # unix time of the ranks' spawn, on that host's clock


@dataclass(frozen=True, kw_only=True)
class RankStartup:
    """Rank 0's report (`startup: {...}` line)."""
    started_at: float                       # unix time of the rank process's start, on its host's clock
    phases: dict[str, float]                # RANK_PHASES it reached, in seconds


@dataclass(frozen=True, kw_only=True)
class StartupTimings:
    """Seconds per phase from the command's start to rank 0's first step; None: not measured or not reached."""
    attempt: int
    host: str | None = None                 # the host of rank 0, whose launch figures these are
    total: float | None = None              # head clock: command start (restart: its launch) -> first step seen
    cli_import: float | None = None         # the command's start -> the train command's entry
    planning: float | None = None           # recipe, fleet, the hosts' probe, the plan
    head_data: float | None = None          # data prepared or found on the head
    launch_prep: float | None = None        # the head: job plan and supervisor, up to spawning the agents
    connect: float | None = None            # ssh (or srun) to the host and back
    agent_start: float | None = None        # the host agent: Python start -> ranks spawned
    rank_spawn: float | None = None         # ranks spawned -> rank 0's process started
    rank_imports: float | None = None       # rank process start -> torch, transformers, deepspeed imported
    rendezvous: float | None = None         # the ranks' process group (init_process_group)
    rank_data: float | None = None          # tokenizer, prepared data mapped, batch layout, DeepSpeed config
    model_build: float | None = None        # the model built (and LoRA applied)
    deepspeed_init: float | None = None     # deepspeed.initialize
    run_setup: float | None = None          # peak FLOP/s measured, resume check, metrics writer
    first_step: float | None = None         # the first optimizer step, all micro batches
    hosts: dict[str, dict[str, float | None]] = field(default_factory=dict)   # every host: connect, agent_start

    @property
    def other(self) -> float | None:
        """The total less every measured phase: output passing back to the head, and small gaps."""
        if self.total is None:
            return None
        return self.total - sum(seconds for _, _, seconds in phase_rows(self) if seconds is not None)


# Field -> how a person reads it, in the order they happen.
PHASE_LABELS = {"cli_import": "cli import", "planning": "planning", "head_data": "data on the head",
                "launch_prep": "launch prep", "connect": "connect", "agent_start": "agent",
                "rank_spawn": "rank spawn", "rank_imports": "rank imports", "rendezvous": "rendezvous",
                "rank_data": "rank data", "model_build": "model", "deepspeed_init": "deepspeed init",
                "run_setup": "run setup", "first_step": "first step"}
_RANK_FIELDS = dict(zip(RANK_PHASES, ("rank_imports", "rendezvous", "rank_data", "model_build", "deepspeed_init",
                                      "run_setup", "first_step")))


def phase_rows(timings: StartupTimings) -> list[tuple[str, str, float | None]]:
    """(field, label, seconds) for every phase, in order."""
    return [(name, label, getattr(timings, name)) for name, label in PHASE_LABELS.items()]


def parse_rank_startup(text: str) -> RankStartup | None:
    """The JSON after the `startup: ` prefix; None when it is not a well-formed report."""
    try:
        data = json.loads(text)
        phases = {name: float(data["phases"][name]) for name in RANK_PHASES if name in data["phases"]}
        return RankStartup(started_at=float(data["started_at"]), phases=phases)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _connect_seconds(launch: HostLaunch) -> float | None:
    if launch.transport == "local" or None in (launch.spawned, launch.first_event, launch.agent_seconds):
        return None
    return launch.first_event - launch.spawned - launch.agent_seconds


def combine_startup(*, attempt: int, head: HeadStartup | None, attempt_started: float, host: str | None,
                    launches: dict[str, HostLaunch], rank: RankStartup | None,
                    first_step_seen: float | None) -> StartupTimings:
    """One attempt's figures. `attempt_started`, `first_step_seen` and every `HostLaunch` time except the
    agent's own are on the head's monotonic clock; `host` is rank 0's host (None: not known)."""
    head = head if attempt == 0 else None
    started = head.process_started if head else attempt_started
    prep_from = head.ended if head else attempt_started
    launch = launches.get(host) if host else None
    spawn = None
    if launch and rank and launch.ranks_spawned_at is not None:
        spawn = rank.started_at - launch.ranks_spawned_at
    rank_fields = {_RANK_FIELDS[name]: seconds for name, seconds in (rank.phases if rank else {}).items()}
    reached_first_step = rank is not None and "first_step" in rank.phases and first_step_seen is not None
    return StartupTimings(
        attempt=attempt, host=host, total=first_step_seen - started if reached_first_step else None,
        cli_import=head.cli_import if head else None, planning=head.planning if head else None,
        head_data=head.data if head else None,
        launch_prep=launch.spawned - prep_from if launch and launch.spawned is not None else None,
        connect=_connect_seconds(launch) if launch else None,
        agent_start=launch.agent_seconds if launch else None, rank_spawn=spawn, **rank_fields,
        hosts={label: {"connect": _connect_seconds(each), "agent_start": each.agent_seconds}
               for label, each in launches.items()})


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_startup_line(timings: StartupTimings) -> str:
    """One line: `startup 23.4 s to the first step: cli import 0.9 · planning 1.2 · ...`."""
    head = (f"startup {timings.total:.1f} s to the first step" if timings.total is not None
            else "startup: rank 0 did not reach its first step")
    if timings.attempt:
        head += f" (restart {timings.attempt})"
    parts = [f"{label} {_seconds(seconds)}" for _, label, seconds in phase_rows(timings)]
    if timings.other is not None:
        parts.append(f"other {timings.other:.1f}")
    return f"{head}: {' · '.join(parts)}"


def render_startup_table(timings: StartupTimings) -> str:
    """Every phase with its seconds and share of the total (--timings)."""
    rows = [(label, seconds) for _, label, seconds in phase_rows(timings)]
    rows.append(("other (output back to the head, gaps)", timings.other))
    width = max(len(label) for label, _ in rows)
    where = f" on {timings.host}" if timings.host else ""
    lines = [f"startup phases{where}" + (f", restart {timings.attempt}" if timings.attempt else "") + ":",
             f"  {'phase':<{width}}  {'seconds':>8}  {'share':>6}"]
    for label, seconds in rows:
        share = "-" if seconds is None or not timings.total else f"{seconds / timings.total:.0%}"
        lines.append(f"  {label:<{width}}  {_seconds(seconds):>8}  {share:>6}")
    total = "-" if timings.total is None else f"{timings.total:.1f}"
    lines.append(f"  {'total to the first step':<{width}}  {total:>8}  {'100%' if timings.total else '-':>6}")
    return "\n".join(lines)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    return {key: _rounded(item) for key, item in value.items()} if isinstance(value, dict) else value


def startup_json(timings: StartupTimings) -> str:
    """Seconds to the millisecond; null: not measured or not reached."""
    return json.dumps(_rounded({**asdict(timings), "other": timings.other}), indent=2) + "\n"


def write_startup_json(directory: Path, timings: StartupTimings) -> Path:
    """directory/startup.json, replaced atomically (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STARTUP_FILE
    temporary = path.with_name(f".{STARTUP_FILE}.{os.getpid()}.tmp")
    temporary.write_text(startup_json(timings))
    os.replace(temporary, path)
    return path


class StartupWatch:
    """One attempt's startup as the supervisor sees it happen (it calls `spawned`, `event`, `rank_report`)."""

    def __init__(self, *, attempt: int, head: HeadStartup | None, log_dir: Path, transports: dict[str, str],
                 started: float | None = None) -> None:
        self.attempt, self.head, self.log_dir = attempt, head, log_dir
        self.started = time.monotonic() if started is None else started
        self.launches = {label: HostLaunch(transport=transport) for label, transport in transports.items()}
        self.rank0_host = next(iter(transports), None)   # rank 0 is on node rank 0, the first host
        self.rank: RankStartup | None = None
        self.first_step_seen: float | None = None

    def spawned(self, label: str) -> None:
        self.launches[label].spawned = time.monotonic()

    def event(self, label: str, event: dict) -> None:
        launch = self.launches[label]
        if launch.first_event is None:
            launch.first_event = time.monotonic()
        if event.get("event") == "started":
            launch.agent_seconds = event.get("agent_seconds")
            launch.ranks_spawned_at = event.get("spawned_at")

    def rank_report(self, label: str, text: str) -> str | None:
        """Rank 0's `startup:` report arrived from `label`: saves startup.json, returns the line to show."""
        if self.rank is not None or (rank := parse_rank_startup(text)) is None:
            return None
        self.rank, self.rank0_host, self.first_step_seen = rank, label, time.monotonic()
        timings = self.timings()
        write_startup_json(self.log_dir, timings)
        return render_startup_line(timings)

    def timings(self) -> StartupTimings:
        return combine_startup(attempt=self.attempt, head=self.head, attempt_started=self.started,
                               host=self.rank0_host, launches=self.launches, rank=self.rank,
                               first_step_seen=self.first_step_seen)


def finish_startup(watch: StartupWatch, *, table: bool) -> list[str]:
    """At an attempt's end: startup.json saved; the lines to show (the one-line summary when rank 0 never
    reported, so it was not shown yet; the table with --timings)."""
    timings = watch.timings()
    write_startup_json(watch.log_dir, timings)
    return ([] if watch.rank else [render_startup_line(timings)]) + ([render_startup_table(timings)] if table else [])
