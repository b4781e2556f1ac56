"""Running the trials: each one is `deepfleet train` (the same command, launch path and supervision)
in a child process, one after another, or `parallel` at a time, each on its own group of hosts.

A child per trial: its supervisor owns its signals and its hosts, and trials never share a process.
SIGINT/SIGTERM to the sweep are passed to the running trials, which write a checkpoint and stop (exit
75); the sweep then records them as interrupted and starts no other.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet
from deepfleet.launch.batch_job import in_job_train_argv
from deepfleet.sweep.grid import Trial
from deepfleet.sweep.sweep_dir import DONE, FAILED, INTERRUPTED, TrialStatus

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def partition_hosts(hosts: Sequence[str], groups: int) -> list[tuple[str, ...]]:
    """`hosts` in `groups` disjoint runs of neighbours in fleet order, sizes differing by at most one
    (the first groups get the extra hosts): 5 hosts in 2 groups -> 3 + 2."""
    if not 1 <= groups <= len(hosts):
        raise ValueError(f"{groups} groups of {len(hosts)} hosts")
    size, extra = divmod(len(hosts), groups)
    result, start = [], 0
    for index in range(groups):
        end = start + size + (1 if index < extra else 0)
        result.append(tuple(hosts[start:end]))
        start = end
    return result


def host_groups(fleet: Fleet, parallel: int) -> list[tuple[str, ...]]:
    """The groups `--parallel` trains on; more groups than hosts is refused."""
    names = [host.name for host in fleet.hosts]
    if parallel > len(names):
        raise DeepfleetError(f"{parallel} trials at a time need {parallel} hosts, {fleet.source} has "
                             f"{len(names)} ({', '.join(names)})", where=f"--parallel {parallel}",
                             fix=f"--parallel {len(names)} or less: each trial at a time needs hosts of its own")
    return partition_hosts(names, parallel)


@dataclass(frozen=True, kw_only=True)
class TrialCommand:
    """What every trial's `deepfleet train` gets besides its own overrides and hosts."""

    recipe_path: str | None                  # absolute; None: the built-in defaults
    base_overrides: tuple[str, ...]
    fleet_args: tuple[str, ...] = ()         # --fleet F / --hostfile H, as the sweep was given them
    nproc: int | None = None
    max_restarts: int = 0
    hang_timeout: float = 60.0
    run_name: str = "sweep"                  # trackers' run name: "<run_name>-<trial id>"
    tags: tuple[str, ...] = ()               # the recipe's tags; "sweep" and the trial id are added


def trial_train_args(command: TrialCommand, trial: Trial, *, output_dir: Path,
                     hosts: Sequence[str] | None) -> list[str]:
    """`deepfleet train`'s arguments for one trial (`hosts`: its group, None: the whole fleet). The trial's
    overrides come after the sweep's base ones, and the sweep's own settings last."""
    tags = [*command.tags, "sweep", trial.id]
    return [*([command.recipe_path] if command.recipe_path else []), *command.base_overrides, *trial.overrides,
            f"output_dir={json.dumps(str(output_dir))}", f"logging.run_name={json.dumps(f'{command.run_name}-{trial.id}')}",
            f"logging.tags={json.dumps(tags)}",
            *command.fleet_args, *(["--include", "@".join(hosts)] if hosts else []),
            *([f"--nproc={command.nproc}"] if command.nproc else []),
            f"--max-restarts={command.max_restarts}", f"--hang-timeout={command.hang_timeout:g}"]


def ending(exit_code: int, *, stop_requested: bool, started: float, seconds: float, error: str) -> TrialStatus:
    """A finished child's exit code as the trial's status: stopped after a checkpoint (75), or stopped by
    the sweep's signal before training began, is interrupted (resumable); anything else non-zero failed."""
    if exit_code == 0:
        return TrialStatus(status=DONE, exit_code=0, started=started, seconds=seconds)
    stopped = exit_code == EXIT_PREEMPTED or (stop_requested and (exit_code < 0 or exit_code in (130, 143)))
    return TrialStatus(status=INTERRUPTED if stopped else FAILED, exit_code=exit_code, started=started,
                       seconds=seconds, error=error)


@dataclass
class _Running:
    trial: Trial
    group: int
    process: subprocess.Popen
    started: float
    reader: threading.Thread | None = None
    last_error: str = ""


class TrialRunner:
    """Starts each trial's child as a group of hosts frees up, streams its output prefixed with the trial
    id (and into its head log), and records each ending through `record`."""

    def __init__(self, *, argv_for: Callable[[Trial, int], list[str]], log_for: Callable[[Trial], Path],
                 record: Callable[[Trial, TrialStatus], None], groups: int, write: Callable[[str], None] = print,
                 inherited_fds: tuple[int, ...] = (), poll_seconds: float = 0.2):
        self.argv_for, self.log_for, self.record = argv_for, log_for, record
        self.inherited_fds = inherited_fds
        self.groups, self.write, self.poll_seconds = groups, write, poll_seconds
        self.stop_requested = False
        self.stop_signal = 0
        self.running: list[_Running] = []
        self.lock = threading.Lock()

    def run(self, trials: Sequence[Trial]) -> None:
        on_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS} if on_main else {}
        pending, told = list(trials), False
        try:
            while (pending and not self.stop_requested) or self.running:
                free = sorted(set(range(self.groups)) - {r.group for r in self.running})
                while pending and free and not self.stop_requested:
                    self._start(pending.pop(0), free.pop(0))
                time.sleep(self.poll_seconds)
                self._reap()
                if self.stop_signal and not told:
                    told = True
                    self._say(f"# {signal.Signals(self.stop_signal).name}: stopping the running trial(s) at a "
                               "checkpoint; run the same command again to resume")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if pending:
            self._say(f"# sweep stopped: {len(pending)} trial(s) not started")

    def _say(self, line: str) -> None:
        with self.lock:   # whole lines: the trials' output threads write too
            self.write(line)

    def _request_stop(self, signum: int, frame: object) -> None:
        # No printing here: the handler may interrupt a print of this thread (a reentrant write fails).
        self.stop_requested, self.stop_signal = True, self.stop_signal or signum
        for running in self.running:
            if running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)

    def _start(self, trial: Trial, group: int) -> None:
        argv = in_job_train_argv(self.argv_for(trial, group))
        log = self.log_for(trial)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._say(f"# {trial.id}: {trial.label}")
        # A session of its own: a terminal's Ctrl-C reaches the sweep only, which passes one SIGTERM on.
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, errors="replace", bufsize=1, start_new_session=True,
                                   pass_fds=self.inherited_fds)
        running = _Running(trial=trial, group=group, process=process, started=time.time())
        running.reader = threading.Thread(target=self._stream, args=(running, log), daemon=True)
        running.reader.start()
        self.running.append(running)
        if self.stop_requested:   # a signal between the check and the start
            process.send_signal(signal.SIGTERM)

    def _stream(self, running: _Running, log: Path) -> None:
        with log.open("a", encoding="utf-8") as handle:
            for line in running.process.stdout:
                line = line.rstrip("\n")
                handle.write(line + "\n")
                handle.flush()
                if line.startswith("error: "):
                    running.last_error = line.removeprefix("error: ")
                with self.lock:
                    self.write(f"[{running.trial.id}] {line}")

    def _reap(self) -> None:
        for running in [r for r in self.running if r.process.poll() is not None]:
            if running.reader is not None:
                running.reader.join()
            self.running.remove(running)
            status = ending(running.process.returncode, stop_requested=self.stop_requested,
                            started=running.started, seconds=time.time() - running.started, error=running.last_error)
            self.record(running.trial, status)
            self._say(f"# {running.trial.id}: {status.status}"
                       + (f" (exit code {status.exit_code})" if status.exit_code else ""))
