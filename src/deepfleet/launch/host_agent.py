"""The per-host agent: `python -m deepfleet.launch.host_agent --job-id ID -- CMD...`, started over ssh.

It is the one process on a host that knows which processes belong to this job, so teardown never
needs a broad `pkill`. Protocol on stdin (from the head, one line each):

  first line   {"env": {...}}   environment for CMD (secrets travel here, never on a command line)
  "ping"       the head is alive; no ping for --lifeline-timeout seconds means the head or the link
               is gone, and the agent tears the job down by itself (a partitioned host cannot be
               reached, so it must clean up on its own)
  "term"       graceful stop: SIGTERM to every process of the job (ranks checkpoint), SIGKILL after --grace
  "kill"/EOF   teardown: SIGTERM, then SIGKILL after a short grace

On stdout it passes CMD's output through and adds event lines `@@deepfleet {json}`: started (with
the agent's own startup seconds and the unix time it spawned CMD, for startup timings),
heartbeat (newest step and age per local rank, from the files ranks write to DEEPFLEET_HEARTBEAT_DIR)
and exit. Only the standard library is used so it starts in milliseconds on every host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from deepfleet.contract import (AGENT_EVENT_PREFIX, EXIT_LIFELINE_LOST, HEARTBEAT_DIR_ENV, JOB_ID_ENV, heartbeat_rank,
                                heartbeat_step)
from deepfleet.process_start import own_process_age

KILL_GRACE_SECONDS = 3.0


def emit(event: str, **fields) -> None:
    sys.stdout.write(AGENT_EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def job_pids(job_id: str) -> list[int]:
    """Every process on this host whose environment carries this job's id (survives re-parenting and setsid)."""
    marker = f"{JOB_ID_ENV}={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def signal_job(job_id: str, sig: int, *, spare: int | None = None) -> int:
    pids = [pid for pid in job_pids(job_id) if pid != spare]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def stop_job(job_id: str, grace: float, *, spare: int | None = None) -> None:
    """SIGTERM every process of the job (but `spare`), then SIGKILL all that is left after `grace` seconds."""
    if not signal_job(job_id, signal.SIGTERM, spare=spare):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and job_pids(job_id):
        time.sleep(0.1)
    signal_job(job_id, signal.SIGKILL)


def heartbeats(directory: Path) -> dict[str, dict]:
    """{rank: {"step": n, "age": seconds}} from the files ranks rewrite each step."""
    now = time.time()
    result = {}
    for path in directory.iterdir():
        rank = heartbeat_rank(path.name)
        if rank is None:      # the rank's temporary file while it replaces its heartbeat
            continue
        try:
            result[rank] = {"step": heartbeat_step(path.read_text()), "age": round(now - path.stat().st_mtime, 1)}
        except (OSError, ValueError, IndexError):
            continue
    return result


def stopped_ranks(job_id: str) -> list[str]:
    """RANKs of this job's processes that are stopped (state T): a SIGSTOPped or traced rank hangs the job."""
    ranks = []
    for pid in job_pids(job_id):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = next((item[5:].decode() for item in env if item.startswith(b"RANK=")), None)
        if state in ("T", "t") and rank is not None:
            ranks.append(rank)
    return ranks


class Lifeline:
    """Reads the head's stdin lines in a thread; remembers the last ping and any stop request."""

    def __init__(self) -> None:
        self.last_ping = time.monotonic()
        self.request: str | None = None
        self.closed = False

    def read(self, stream) -> None:
        for raw in stream:
            line = raw.strip()
            if line == "ping":
                self.last_ping = time.monotonic()
            elif line in ("term", "kill"):
                self.request = line
        self.closed = True


def with_environment_bin(path: str, python: str) -> str:
    """PATH with the fleet's environment's bin dir first: DeepSpeed builds an op at first use with the
    `ninja` its pip package put there, and ssh's non-login shell does not have that dir on PATH."""
    bin_dir = os.path.dirname(os.path.abspath(python))
    return os.pathsep.join([bin_dir, *(entry for entry in path.split(os.pathsep) if entry and entry != bin_dir)])


def pump_output(stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(line)
        out.flush()


def run(job_id: str, command: list[str], *, env: dict[str, str], cwd: str | None, lifeline_timeout: float,
        grace: float, heartbeat_seconds: float) -> int:
    heartbeat_dir = Path(tempfile.mkdtemp(prefix=f"deepfleet-hb-{job_id}-"))
    child_env = {**os.environ, **env, JOB_ID_ENV: job_id, HEARTBEAT_DIR_ENV: str(heartbeat_dir)}
    child_env["PATH"] = with_environment_bin(child_env.get("PATH", ""), sys.executable)
    lifeline = Lifeline()
    threading.Thread(target=lifeline.read, args=(sys.stdin,), daemon=True).start()
    # SIGTERM to the agent (host shutdown, scancel) is a graceful stop: the ranks get to checkpoint.
    signal.signal(signal.SIGTERM, lambda *_: setattr(lifeline, "request", "term"))
    try:
        child = subprocess.Popen(command, env=child_env, cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        emit("exit", code=127, reason=f"cannot start {command[0]} in {cwd or os.getcwd()}: {exc.strerror}")
        return 127
    agent_seconds, spawned_at = own_process_age(), time.time()   # CMD is running: exec succeeded
    emit("started", pid=child.pid, host_pid=os.getpid(), spawned_at=round(spawned_at, 3),
         agent_seconds=None if agent_seconds is None else round(agent_seconds, 3))
    pump = threading.Thread(target=pump_output, args=(child.stdout, sys.stdout.buffer), daemon=True)
    pump.start()
    reason, next_beat = "", 0.0
    while child.poll() is None:
        now = time.monotonic()
        if lifeline.request == "kill" or lifeline.closed:
            reason = reason or "stopped by the head"
            stop_job(job_id, KILL_GRACE_SECONDS)
        elif now - lifeline.last_ping > lifeline_timeout:
            reason = f"no word from the head for {lifeline_timeout:.0f}s (link or head lost)"
            stop_job(job_id, KILL_GRACE_SECONDS)
        elif lifeline.request == "term":
            reason = "stopped gracefully"
            # Only the ranks get SIGTERM: they checkpoint and exit, and torchrun then ends by itself.
            # torchrun would otherwise SIGKILL its workers after its own 30 s, mid-save. Before any
            # rank exists (torchrun still in rendezvous) torchrun itself is what must stop.
            ranks_exist = any(pid != child.pid for pid in job_pids(job_id))
            stop_job(job_id, grace, spare=child.pid if ranks_exist else None)
        if now >= next_beat:
            emit("heartbeat", ranks=heartbeats(heartbeat_dir), stopped=stopped_ranks(job_id))
            next_beat = now + heartbeat_seconds
        time.sleep(0.1)
    # Workers torchrun started in their own sessions may outlive it: make sure none survive.
    stop_job(job_id, KILL_GRACE_SECONDS)
    pump.join(timeout=5)
    shutil.rmtree(heartbeat_dir, ignore_errors=True)
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    if reason and not lifeline.request and not lifeline.closed:
        code = EXIT_LIFELINE_LOST
    emit("exit", code=code, reason=reason)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepfleet-host-agent")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--lifeline-timeout", type=float, default=15.0)
    parser.add_argument("--grace", type=float, default=60.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=2.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    header = sys.stdin.readline()
    env = json.loads(header).get("env", {}) if header.strip() else {}
    signal.signal(signal.SIGHUP, lambda *_: stop_job(args.job_id, KILL_GRACE_SECONDS) or sys.exit(129))
    return run(args.job_id, command, env=env, cwd=args.cwd, lifeline_timeout=args.lifeline_timeout, grace=args.grace,
               heartbeat_seconds=args.heartbeat_seconds)


if __name__ == "__main__":
    sys.exit(main())
