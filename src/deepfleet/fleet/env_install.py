"""The doing half of `env sync`: wheels onto the head (build, download), then onto each host.

Each host gets one ssh call: its wheels as an uncompressed tar on stdin (wheels are zips
already), read from a file so a multi-GB torch wheel never sits in memory once per host.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.env_sync import EXIT_INSTALL_FAILED, HostPlan, install_argv, last_json
from deepfleet.fleet.package_sets import canonical_name
from deepfleet.fleet.ssh import SshOptions, diagnose, host_argv
from deepfleet.fleet.wheel_sources import WheelSource, find_wheel, human_size, wheel_files

HEAD_COMMAND_TIMEOUT = 1800.0
BUILD_IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                       ".pytest_cache", "runs", "node_modules")


def _run_on_head(argv: Sequence[str]) -> tuple[bool, str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=HEAD_COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return done.returncode == 0, (errors or lines or [""])[-1][:300]


def fetch_wheel(source: WheelSource, plan: HostPlan) -> Path:
    """Run the build or download of `source` on the head; the wheel file it made."""
    if source.kind == "file":
        return source.path
    dest = Path(source.command[source.command.index("--wheel-dir" if source.kind == "build" else "--dest") + 1])
    if source.kind == "build":
        copy = Path(source.command[-1])
        if not copy.exists():
            shutil.copytree(source.source, copy, ignore=BUILD_IGNORED, symlinks=True)
    dest.mkdir(parents=True, exist_ok=True)
    ok, last = _run_on_head(source.command)
    found = find_wheel(source.dist, plan.env.interpreter, wheel_files([dest])) if ok else None
    if found is None:
        what = f"cannot build the wheel of {source.dist.pin} from {source.source}" if source.kind == "build" \
            else f"no wheel of {source.dist.pin} for python {plan.env.interpreter.major_minor} " \
                 f"({plan.env.interpreter.machine}) could be downloaded"
        raise DeepfleetError(f"{what}: {last or 'no wheel came out'}", where=plan.env.host.name,
                             fix=f"put that wheel in a dir and pass --wheel-dir DIR "
                                 f"(e.g. `pip download --no-deps {source.dist.pin} -d DIR` where there is internet)")
    return found


def fetch_all(plans: Sequence[HostPlan]) -> dict[WheelSource, Path]:
    """Each distinct wheel once, however many hosts need it."""
    fetched: dict[WheelSource, Path] = {}
    for plan in plans:
        for source in plan.installs:
            if source not in fetched:
                fetched[source] = fetch_wheel(source, plan)
    return fetched


def write_tar(files: Sequence[Path], target: Path) -> Path:
    with tarfile.open(target, "w") as archive:
        for path in files:
            archive.add(path, arcname=path.name, recursive=False)
    return target


@dataclass(frozen=True, kw_only=True)
class HostInstallResult:
    host: str
    pins: tuple[str, ...]
    bytes_sent: int
    seconds: float
    problem: Problem | None = None
    exit_code: int = 0                # 2: the host refused (temp dir, ssh); 1: pip failed


async def _ssh_with_file(argv: Sequence[str], path: Path, timeout: float) -> tuple[int | None, str, str, bool]:
    with open(path, "rb") as handle:
        process = await asyncio.create_subprocess_exec(*argv, stdin=handle, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
            return process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), False
        except asyncio.TimeoutError:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            await process.wait()
            return None, "", "", True


def failed_pins(pins: Sequence[str], last_error: str) -> list[str]:
    """The pins pip's error line names (by PEP 503 name); all of them when it names none."""
    words = {canonical_name(w.split("==")[0]) for w in last_error.replace(",", " ").replace("'", " ").split()}
    named = [pin for pin in pins if canonical_name(pin.split("==")[0]) in words]
    return named or list(pins)


def result_problem(host: str, pins: Sequence[str], code: int | None, out: str, err: str,
                   timed_out: bool) -> tuple[Problem | None, int]:
    answer = last_json(out)
    if answer is None:
        tail = "timed out" if timed_out else (err.strip().splitlines() or [f"exit {code}"])[-1][:300]
        return Problem(what=f"install did not run: {tail}", where=host,
                       fix="run `deepfleet env check` to see whether the host answers"), 2
    if answer["stage"] in ("tempdir", "receive"):
        return Problem(what=f"cannot write the wheels to its temp dir: {answer['error']}", where=host,
                       fix="free space there, or set TMPDIR on that host to a writable dir"), 2
    if answer["returncode"] != 0:
        return Problem(what=f"pip install {' '.join(failed_pins(pins, answer['last_error']))} failed: "
                            f"{answer['last_error']}", where=host,
                       fix="run the same pip install on that host by hand to see all of its output"), \
            EXIT_INSTALL_FAILED
    return None, 0


async def _install_one(plan: HostPlan, wheels: Sequence[Path], work_dir: Path,
                       options: SshOptions) -> HostInstallResult:
    pins = tuple(source.dist.pin for source in plan.installs)
    tar = write_tar(wheels, work_dir / f"{plan.env.host.name}.tar")
    size = tar.stat().st_size
    argv = host_argv(plan.env.host, install_argv(plan.env.python, pins), options=options)
    if options.control_dir and not plan.env.host.local:
        Path(options.control_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.monotonic()
    # Time for the bytes at a slow 10 MB/s, plus pip's own work.
    code, out, err, timed_out = await _ssh_with_file(argv, tar, options.connect_timeout + 300 + size / 10e6)
    failure = None if plan.env.host.local else diagnose(plan.env.host, code, err, timed_out=timed_out,
                                                        options=options)
    if failure:
        problem, exit_code = Problem(what=failure.what, where=plan.env.host.name, fix=failure.fix), 2
    else:
        problem, exit_code = result_problem(plan.env.host.name, pins, code, out, err, timed_out)
    return HostInstallResult(host=plan.env.host.name, pins=pins, bytes_sent=size,
                             seconds=time.monotonic() - started, problem=problem, exit_code=exit_code)


def install_all(plans: Sequence[HostPlan], fetched: dict[WheelSource, Path], work_dir: Path,
                options: SshOptions) -> list[HostInstallResult]:
    async def every() -> list[HostInstallResult]:
        return list(await asyncio.gather(*(
            _install_one(plan, [fetched[s] for s in plan.installs], work_dir, options)
            for plan in plans if plan.installs)))
    return asyncio.run(every())


def describe_result(result: HostInstallResult) -> str:
    return (f"{result.host}: installed {', '.join(result.pins)} ({human_size(result.bytes_sent)} sent, "
            f"{result.seconds:.1f}s)")
