"""Training on this machine only: the torchrun command (pure), and running it with clean errors.

Every rank runs `python -m deepfleet.train --recipe <run dir>/recipe.json`: the resolved recipe
(overrides applied, `env:` left out because it travels in the environment). Ranks write a
`DeepfleetError` to `<run dir>/errors/rank-N.txt`; the launcher prints that one line instead of
torchrun's traceback, which goes with all library noise to `<run dir>/torchrun.log`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from deepfleet.contract import ERRORS_SUBDIR, EXIT_PREEMPTED, PREEMPTED_FILE, RUN_DIR_ENV, RUNS_ROOT_ENV
from deepfleet.errors import DeepfleetError, Problem
from deepfleet.env_vars import masked

RECIPE_FILE = "recipe.json"
LOG_FILE = "torchrun.log"
DEFAULT_CPU_RANKS = 2
STOP_GRACE_SECONDS = 60   # Ctrl-C/SIGTERM -> SIGKILL: time for the ranks to finish the step and checkpoint


@dataclass(frozen=True, kw_only=True)
class LocalLaunch:
    nproc: int
    run_dir: Path                 # per-run state: resolved recipe, log, rank error files
    python: str = sys.executable
    cpu_threads: int | None = None   # OMP_NUM_THREADS per rank on CPU; None leaves it alone (GPU)
    extra_env: dict[str, str] = field(default_factory=dict)   # the recipe's env: section

    @property
    def recipe_file(self) -> Path:
        return self.run_dir / RECIPE_FILE

    @property
    def log_file(self) -> Path:
        return self.run_dir / LOG_FILE


def default_nproc(*, gpus: int) -> int:
    """One rank per visible GPU; without GPUs, 2 CPU ranks (gloo), enough to exercise data parallelism."""
    return gpus if gpus > 0 else DEFAULT_CPU_RANKS


def cpu_threads_per_rank(*, cpu_count: int, nproc: int) -> int:
    return max(1, cpu_count // nproc)


def rank_command(python: str, recipe_file: Path) -> list[str]:
    """What each rank runs; the multi-host launcher runs the same command under its own torchrun."""
    return [python, "-m", "deepfleet.train", "--recipe", str(recipe_file)]


def local_torchrun_command(launch: LocalLaunch) -> tuple[list[str], dict[str, str]]:
    """(argv, env additions) for one torchrun on this machine, its rendezvous on a free loopback port."""
    argv = [launch.python, "-m", "deepfleet.launch.bound_torchrun", "--nnodes=1", "--node-rank=0",
            "--master-addr=127.0.0.1", "--master-port=0", f"--nproc-per-node={launch.nproc}",
            # torchrun SIGKILLs its workers 30 s after it is signalled unless told otherwise.
            f"--shutdown-timeout={STOP_GRACE_SECONDS}", "--no-python", *rank_command(launch.python, launch.recipe_file)]
    env = {RUN_DIR_ENV: str(launch.run_dir),
           **({"OMP_NUM_THREADS": str(launch.cpu_threads)} if launch.cpu_threads else {}),
           **launch.extra_env}
    return argv, env


def render_command(argv: list[str], env: Mapping[str, str]) -> str:
    """The command as a shell line, secrets masked: what --dry-run prints."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in masked(env).items()]
    return " ".join(["env", *assignments, *map(shlex.quote, argv)]) if assignments else shlex.join(argv)


def new_run_dir(output_dir: Path, *, root: Path | None = None) -> Path:
    """A fresh path for this run's state (not created): <root>/<output name>-<time>-<pid>.

    The default root is per user, not in /tmp: the ranks load their recipe from the run dir, so
    nobody else may be able to create or write it.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = root or Path(os.environ.get(RUNS_ROOT_ENV) or cache / "deepfleet" / "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{output_dir.resolve().name}-{stamp}-{os.getpid()}"


def create_run_dir(run_dir: Path) -> None:
    """Create the run dir private (0700); it must not exist yet, so nothing planted there is used."""
    run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.mkdir(mode=0o700)


def rank_errors(run_dir: Path) -> list[str]:
    """Distinct error lines the ranks reported, in rank order (every rank usually reports the same)."""
    directory = run_dir / ERRORS_SUBDIR
    if not directory.is_dir():
        return []
    lines: list[str] = []
    for path in sorted(directory.glob("rank-*.txt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        for line in path.read_text().splitlines():
            if line.strip() and line not in lines:
                lines.append(line)
    return lines


def last_exception_line(log_file: Path) -> str:
    """The last `SomeError: message` a rank printed, for a one-line summary of an unexpected failure."""
    if not log_file.is_file():
        return ""
    pattern = re.compile(r"^(?:\[\S+\]:)?\s*([A-Za-z_.]*(?:Error|Exception)\b:.*)$")
    found = ""
    for line in log_file.read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match and "ChildFailedError" not in line:
            found = match.group(1).strip()
    return found


def run_local(launch: LocalLaunch) -> None:
    """Run torchrun; rank 0's console goes to our stdout, everything else to the run dir's log.

    Raises DeepfleetError with the ranks' own error lines (exit 2), or a one-line failure summary.
    """
    argv, env = local_torchrun_command(launch)
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    with launch.log_file.open("w") as log:
        log.write("$ " + render_command(argv, env) + "\n")
        log.flush()
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=None, stderr=log,
                                   start_new_session=True)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            # Ranks checkpoint on SIGTERM and exit 75; report that like any preemption below.
            code = _stop(process)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code == 0:
        return
    preempted = launch.run_dir / PREEMPTED_FILE
    if preempted.is_file():
        info = json.loads(preempted.read_text())
        raise DeepfleetError(f"stopped by signal after step {info['step']}; checkpoint {info['checkpoint']} is complete",
                             where="train", fix="run the same command again to resume", exit_code=EXIT_PREEMPTED)
    reported = rank_errors(launch.run_dir)
    if reported:
        # Bad input the ranks found: the line says it all, so the run's state is not kept.
        shutil.rmtree(launch.run_dir, ignore_errors=True)
        raise DeepfleetError(problems=[Problem(what=line.removeprefix("error: ")) for line in reported])
    cause = last_exception_line(launch.log_file) or f"torchrun exited with code {code}"
    raise DeepfleetError(f"training failed: {cause}", where="train", exit_code=1,
                         fix=f"see the full log {launch.log_file}")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS + 5) -> int:
    """Ctrl-C or SIGTERM: SIGTERM to torchrun and its ranks (they checkpoint); SIGKILL after `grace`."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
    except ProcessLookupError:
        return process.wait()
