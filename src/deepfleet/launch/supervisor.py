"""One place that sees every host of a job: streams logs, detects failure, tears everything down.

Each host runs a host agent (see host_agent.py), started by a command the backend built (ssh, or
directly for the head). The supervisor feeds each agent its environment and a ping every second
on stdin, reads its output and events, and stops the whole job on the first of:
- a host's command exiting non-zero (a rank died, or ssh dropped: exit 255);
- no event from a host for `link_timeout` seconds (partition: agents send a heartbeat every 2 s);
- a rank whose training heartbeat has not advanced for `hang_timeout` seconds. Ranks write step -1
  while starting (loading, rendezvous); that phase gets the longer `startup_timeout`. A command that
  writes no heartbeat at all (any user script under `launch`) is only watched for exits and links.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deepfleet.contract import (AGENT_EVENT_PREFIX, EXIT_BAD_INPUT, EXIT_PREEMPTED, RANK_ERROR_LINE, RANK_LINE,
                                RANK_PREEMPTED_LINE, RANK_STARTUP_LINE)
from deepfleet.launch.host_ranks import shell_exit_code
from deepfleet.launch.startup_timings import StartupWatch

SSH_FAILED = 255
# Agents send an event every 2 s; a host missing three while a job hangs is the likelier cause
# than any rank that is only waiting for it (it may be partitioned before link_timeout says so).
SILENT_HOST_SECONDS = 6.0
OUTPUT_LINE_LIMIT = 1 << 20   # longer lines (tqdm's \r updates on one line) lose their start, not the log
# Library output known to be harmless: kept in the host logs, not shown on the console. A Python
# warning is followed by its source line ("  warnings.warn(" or torch's "  return func(*args, ...)").
HARMLESS_OUTPUT = re.compile("|".join(re.escape(text) for text in (
    "hostname of the client socket cannot be retrieved",
    "Attempting to get learning rate from scheduler before it has started",
    "all_gather_into_tensor",
    "_all_gather_base",
    "is deprecated and will be removed in v6",
    "Setting accelerator to CPU",
    "deepspeed_shm_comm_op built successfully",
    "Writing model shards",
)) + r"|^\s+(warnings\.warn\(|return func\(\*args, \*\*kwargs\))|^$")


@dataclass(frozen=True, kw_only=True)
class HostProcess:
    label: str               # host name/address, used in logs and the summary
    argv: list[str]          # what the head runs to reach this host's agent
    env: dict[str, str]      # sent on stdin: never on a command line
    transport: str = "local"  # how argv reaches the host: "ssh", "srun" or "local"


@dataclass(frozen=True, kw_only=True)
class SupervisorOptions:
    log_dir: Path
    hang_timeout: float = 60.0
    startup_timeout: float = 900.0
    link_timeout: float = 15.0
    teardown_timeout: float = 10.0
    graceful_timeout: float = 90.0
    all_logs: bool = False


@dataclass(kw_only=True)
class HostState:
    spec: HostProcess
    proc: asyncio.subprocess.Process | None = None
    last_event: float = field(default_factory=time.monotonic)
    steps: dict[str, tuple[int, float]] = field(default_factory=dict)   # rank -> (step, when it advanced)
    stopped: list[str] = field(default_factory=list)                     # ranks in state T
    preempted_line: str | None = None                                    # set once its ranks checkpointed and stopped
    tail: deque = field(default_factory=lambda: deque(maxlen=20))
    exit_code: int | None = None
    exit_reason: str = ""
    failed_rank: str | None = None                                       # the agent's first failed rank
    rank_errors: list[str] = field(default_factory=list)                # a rank's bad-input lines


@dataclass(frozen=True, kw_only=True)
class Failure:
    host: str
    rank: str | None
    why: str
    last_lines: list[str]


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    exit_code: int
    failure: Failure | None
    teardown_seconds: float | None
    host_exit_codes: dict[str, int | None]
    stopped_by_signal: bool = False
    preempted: bool = False
    preempted_line: str | None = None                    # "[N]:preempted: stopped at step S; checkpoint P"
    bad_input: list[str] = field(default_factory=list)   # the ranks' own error lines: exit 2, not worth a restart


class ConsoleWriter:
    """Streams lines to `write` from a thread: a console that blocks (Ctrl-S, a stalled terminal)
    must not stop the event loop, whose pings keep the agents from tearing the job down. Lines
    beyond the queue's size are dropped (and counted); the host logs keep everything."""

    def __init__(self, write: Callable[[str], None], size: int = 10_000) -> None:
        self.write = write
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=size)
        self.dropped = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, line: str) -> None:
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded in time: the console may still be blocked)."""
        with contextlib.suppress(queue.Full):
            self.lines.put(None, timeout=timeout)
        self.thread.join(timeout)
        if self.dropped:
            self.write(f"[{self.dropped} console lines dropped while the console was blocked; the host logs have them]")

    def _drain(self) -> None:
        while (line := self.lines.get()) is not None:
            self.write(line)


class Supervisor:
    def __init__(self, hosts: list[HostProcess], options: SupervisorOptions,
                 write: Callable[[str], None] = print, startup: StartupWatch | None = None) -> None:
        self.hosts = [HostState(spec=h) for h in hosts]
        self.options = options
        self.startup = startup
        self.console = ConsoleWriter(write)
        self.failure: Failure | None = None
        self.stop_requested = False
        self.detected_at: float | None = None

    async def run(self) -> JobOutcome:
        self.options.log_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        # Signal handlers can only be installed from the main thread; elsewhere the caller owns signals.
        signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._request_stop)
        self.console.start()
        try:
            await asyncio.gather(*(self._start(h) for h in self.hosts))
            tasks = [asyncio.create_task(self._follow(h)) for h in self.hosts]
            pinger = asyncio.create_task(self._ping())
            await self._watch()
            teardown = await self._teardown()
            pinger.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self.console.close()
        codes = {h.spec.label: h.exit_code for h in self.hosts}
        preempted = [h.preempted_line for h in self.hosts if h.preempted_line] if self.failure is None else []
        if preempted:
            return JobOutcome(exit_code=EXIT_PREEMPTED, failure=None, teardown_seconds=teardown, host_exit_codes=codes,
                              stopped_by_signal=self.stop_requested, preempted=True, preempted_line=preempted[0])
        if self.failure is None and not self.stop_requested:
            return JobOutcome(exit_code=0, failure=None, teardown_seconds=None, host_exit_codes=codes)
        failed_code = codes.get(self.failure.host) if self.failure else None
        first_code = failed_code or next((c for c in codes.values() if c not in (0, None)), 1)
        bad_input = list(dict.fromkeys(line for h in self.hosts for line in h.rank_errors))
        return JobOutcome(exit_code=EXIT_BAD_INPUT if bad_input else shell_exit_code(first_code), failure=self.failure,
                          teardown_seconds=teardown, host_exit_codes=codes, stopped_by_signal=self.stop_requested,
                          bad_input=bad_input)

    def _request_stop(self) -> None:
        self.stop_requested = True

    async def _start(self, host: HostState) -> None:
        if self.startup:
            self.startup.spawned(host.spec.label)
        host.proc = await asyncio.create_subprocess_exec(
            *host.spec.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=OUTPUT_LINE_LIMIT)
        await self._send(host, json.dumps({"env": host.spec.env}))

    async def _send(self, host: HostState, line: str) -> None:
        if host.proc and host.proc.stdin and not host.proc.stdin.is_closing():
            try:
                host.proc.stdin.write((line + "\n").encode())
                await host.proc.stdin.drain()
            except (ConnectionError, BrokenPipeError):
                pass

    async def _ping(self) -> None:
        while True:
            await asyncio.gather(*(self._send(h, "ping") for h in self.hosts))
            await asyncio.sleep(1.0)

    async def _follow(self, host: HostState) -> None:
        assert host.proc and host.proc.stdout
        log_path = self.options.log_dir / f"{_file_safe(host.spec.label)}.log"
        with log_path.open("a", encoding="utf-8", errors="replace") as log:
            async for raw in _lines(host.proc.stdout):
                host.last_event = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(AGENT_EVENT_PREFIX):
                    self._on_event(host, json.loads(line[len(AGENT_EVENT_PREFIX):]))
                    continue
                if (report := RANK_STARTUP_LINE.match(line)) and self.startup:
                    log.write(line + "\n")
                    if shown := self.startup.rank_report(host.spec.label, report.group(2)):
                        self.console.put(shown)
                    continue
                log.write(line + "\n")
                log.flush()
                host.tail.append(line)
                if RANK_PREEMPTED_LINE.match(line):
                    host.preempted_line = line
                if error := RANK_ERROR_LINE.match(line):
                    host.rank_errors.append(error.group(2))
                rank = RANK_LINE.match(line)
                hidden = bool(HARMLESS_OUTPUT.search(line[rank.end():] if rank else line))
                if not hidden and (self.options.all_logs or (rank and rank.group(1) == "0")):
                    self.console.put(f"{host.spec.label}/{line}" if rank else f"{host.spec.label}: {line}")
        host.exit_code = await host.proc.wait()
        # A preempted host is not a failure: every rank stops at the same step, so the other hosts
        # are writing the same checkpoint and must not be torn down mid-save.
        if host.exit_code != 0 and not host.preempted_line and self.failure is None and not self.stop_requested \
                and self.detected_at is None:
            why = host.exit_reason or ("ssh connection dropped or failed" if host.exit_code == SSH_FAILED
                                       else f"exited with code {host.exit_code}")
            self._fail(host, host.failed_rank, why)

    def _on_event(self, host: HostState, event: dict) -> None:
        now = time.monotonic()
        if self.startup:
            self.startup.event(host.spec.label, event)
        if event.get("event") == "heartbeat":
            for rank, beat in event.get("ranks", {}).items():
                previous = host.steps.get(rank)
                if previous is None or beat["step"] != previous[0]:
                    host.steps[rank] = (beat["step"], now - beat.get("age", 0.0))
            host.stopped = event.get("stopped", [])
        elif event.get("event") == "exit":
            host.exit_reason = event.get("reason", "")
            host.failed_rank = None if event.get("rank") is None else str(event["rank"])

    def _fail(self, host: HostState, rank: str | None, why: str) -> None:
        if self.failure is None:
            self.detected_at = time.monotonic()
            self.failure = Failure(host=host.spec.label, rank=rank, why=why, last_lines=list(host.tail))

    async def _watch(self) -> None:
        while self.failure is None and not self.stop_requested:
            if all(h.exit_code is not None for h in self.hosts):
                return
            now = time.monotonic()
            for host in self.hosts:
                if host.exit_code is not None:
                    continue
                if now - host.last_event > self.options.link_timeout:
                    self._fail(host, None, f"no word from the host for {self.options.link_timeout:.0f}s "
                                           "(network partition or host down)")
            self._check_progress(now)
            await asyncio.sleep(0.25)

    def _check_progress(self, now: float) -> None:
        """On a hang every rank stalls in the same collective; blame a stopped rank, a silent host, else the
        rank furthest behind."""
        beats = [(step, since, host, rank) for host in self.hosts if host.exit_code is None
                 for rank, (step, since) in host.steps.items()]
        def stale(step: int, since: float) -> bool:
            limit = self.options.startup_timeout if step < 0 else self.options.hang_timeout
            return now - since > limit

        if not any(stale(step, since) for step, since, _, _ in beats):
            return
        stopped = [(host, rank) for host in self.hosts for rank in host.stopped]
        if stopped:
            host, rank = stopped[0]
            self._fail(host, rank, "rank is stopped (SIGSTOP or a debugger) and the job made no progress")
            return
        silent = [host for host in self.hosts if host.exit_code is None and now - host.last_event > SILENT_HOST_SECONDS]
        if silent:
            host = max(silent, key=lambda h: now - h.last_event)
            self._fail(host, None, f"no word from the host for {now - host.last_event:.0f}s and the job made no "
                                   "progress (network partition or host down)")
            return
        step, _, host, rank = min(beats, key=lambda beat: (beat[0], beat[1]))
        phase = "while starting" if step < 0 else f"after step {step}"
        self._fail(host, rank, f"no progress {phase}; rank {rank} is furthest behind")

    async def _teardown(self) -> float | None:
        running = [h for h in self.hosts if h.proc and h.proc.returncode is None]
        if not running:
            return None
        started = self.detected_at or time.monotonic()
        graceful = self.stop_requested and self.failure is None
        word = "term" if graceful else "kill"
        # A silent host cannot hear us; its agent tears itself down when the head's pings stop.
        silent = [h for h in running if time.monotonic() - h.last_event > self.options.link_timeout]
        for host in silent:
            host.proc.kill()
        await asyncio.gather(*(self._send(h, word) for h in running if h not in silent))
        if not graceful:
            for host in running:
                host.proc.stdin.close()
        limit = self.options.graceful_timeout if graceful else self.options.teardown_timeout
        waits = [asyncio.wait_for(h.proc.wait(), timeout=limit) for h in running]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for host, result in zip(running, results):
            if isinstance(result, asyncio.TimeoutError):
                host.proc.kill()
                await host.proc.wait()
        return time.monotonic() - started


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


async def _lines(stream: asyncio.StreamReader):
    """The stream's lines; one longer than the reader's limit is cut (readline drops what it buffered)."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            yield b"[deepfleet: the start of a line over 1 MiB was dropped]\n"
            continue
        if not raw:
            return
        yield raw


def render_summary(outcome: JobOutcome) -> str:
    if outcome.preempted:
        return (f"job preempted: every rank wrote its checkpoint and stopped (exit {EXIT_PREEMPTED}); "
                "run the same command again to resume")
    if outcome.failure is None:
        return "job stopped by signal" if outcome.stopped_by_signal else "job finished on every host"
    f = outcome.failure
    where = f"{f.host}" + (f" rank {f.rank}" if f.rank else "")
    lines = [f"job failed: first failure on {where}: {f.why}", *outcome.bad_input]
    if outcome.teardown_seconds is not None:
        lines.append(f"torn down on every host {outcome.teardown_seconds:.1f}s after detection")
    else:
        lines.append("every other host had already stopped by itself")
    if f.last_lines and not outcome.bad_input:   # with bad input the error lines say it all
        lines.append(f"last lines from {f.host}:")
        lines.extend("  " + line for line in f.last_lines[-10:])
    return "\n".join(lines)
