"""The per-host agent: `python -m deepfleet.launch.host_agent --job-id ID --node-rank N ... -- CMD...`,
started over ssh (or srun, or here). It starts this host's ranks, each running CMD (host_ranks.py).

It is the one process on a host that knows which processes belong to this job, so teardown never
needs a broad `pkill`. Protocol on stdin (from the head, one line each):

  first line   {"env": {...}}   environment for CMD (secrets travel here, never on a command line)
  "ping"       the head is alive; no ping for --lifeline-timeout seconds means the head or the link
               is gone, and the agent tears the job down by itself (a partitioned host cannot be
               reached, so it must clean up on its own)
  "term"       graceful stop: SIGTERM to the ranks (they checkpoint), SIGKILL after --grace
  "kill"/EOF   teardown: SIGTERM, then SIGKILL after a short grace

On stdout it passes the ranks' output through ("[rank]:" before each line) and adds event lines
`@@deepfleet {json}`: started (with the agent's own startup seconds and the unix time it spawned the
ranks, for startup timings), heartbeat (newest step and age per local rank, from the files ranks
write to DEEPFLEET_HEARTBEAT_DIR) and exit (with the rank that failed first, if one did). Only the
standard library is used so it starts in milliseconds on every host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from deepfleet.contract import (AGENT_EVENT_PREFIX, EXIT_LIFELINE_LOST, HEARTBEAT_DIR_ENV, JOB_ID_ENV, heartbeat_rank,
                                heartbeat_step)
from deepfleet.launch.host_ranks import HostRanks, RankLayout
from deepfleet.process_start import spawn_mark

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
    """SIGTERM every process of the job but `spare`, wait up to `grace` seconds for them to end, then
    SIGKILL what is left of them."""
    if not signal_job(job_id, signal.SIGTERM, spare=spare):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and [pid for pid in job_pids(job_id) if pid != spare]:
        time.sleep(0.1)
    signal_job(job_id, signal.SIGKILL, spare=spare)


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


def run(job_id: str, layout: RankLayout, command: list[str], *, env: dict[str, str], cwd: str | None,
        lifeline_timeout: float, grace: float, heartbeat_seconds: float) -> int:
    heartbeat_dir = Path(tempfile.mkdtemp(prefix=f"deepfleet-hb-{job_id}-"))
    child_env = {**os.environ, **env, JOB_ID_ENV: job_id, HEARTBEAT_DIR_ENV: str(heartbeat_dir)}
    child_env["PATH"] = with_environment_bin(child_env.get("PATH", ""), sys.executable)
    lifeline = Lifeline()
    threading.Thread(target=lifeline.read, args=(sys.stdin,), daemon=True).start()
    # SIGTERM to the agent (host shutdown, scancel) is a graceful stop: the ranks get to checkpoint.
    signal.signal(signal.SIGTERM, lambda *_: setattr(lifeline, "request", "term"))
    agent_seconds, spawned_at = spawn_mark()
    try:
        ranks = HostRanks(layout, command, env=child_env, cwd=cwd)
    except OSError as exc:
        stop_job(job_id, KILL_GRACE_SECONDS)
        reason = (f"cannot listen for the rendezvous on {layout.master_addr}:{layout.master_port}: {exc.strerror} "
                  "(free the port or choose another master_port)" if exc.filename is None
                  else f"cannot start {command[0]} in {cwd or os.getcwd()}: {exc.strerror}")
        emit("exit", code=127, reason=reason)
        return 127
    emit("started", pids=ranks.pids, host_pid=os.getpid(), spawned_at=math.floor(spawned_at * 1000) / 1000,
         agent_seconds=None if agent_seconds is None else round(agent_seconds, 3))
    reason, next_beat = "", 0.0
    while (code := ranks.poll()) is None:
        now = time.monotonic()
        if lifeline.request == "kill" or lifeline.closed:
            reason = reason or "stopped by the head"
            stop_job(job_id, KILL_GRACE_SECONDS)
        elif now - lifeline.last_ping > lifeline_timeout:
            reason = f"no word from the head for {lifeline_timeout:.0f}s (link or head lost)"
            stop_job(job_id, KILL_GRACE_SECONDS)
        elif lifeline.request == "term":
            reason = "stopped gracefully"
            # The ranks checkpoint and exit; the rendezvous store stays for them until they have.
            stop_job(job_id, grace, spare=ranks.store_pid)
        elif ranks.failure:
            stop_job(job_id, KILL_GRACE_SECONDS)   # the others would wait for the failed rank forever
        if now >= next_beat:
            emit("heartbeat", ranks=heartbeats(heartbeat_dir), stopped=stopped_ranks(job_id))
            next_beat = now + heartbeat_seconds
        time.sleep(0.1)
    ranks.close()
    stop_job(job_id, KILL_GRACE_SECONDS)   # the store, and anything a rank started in its own session
    shutil.rmtree(heartbeat_dir, ignore_errors=True)
    if reason and not lifeline.request and not lifeline.closed:
        code = EXIT_LIFELINE_LOST
    emit("exit", code=code, reason=reason, rank=ranks.failed_rank)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepfleet-host-agent")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--lifeline-timeout", type=float, default=15.0)
    parser.add_argument("--grace", type=float, default=60.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=2.0)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1, help="ranks on this host")
    parser.add_argument("--first-rank", type=int, default=0, help="global rank of this host's first rank")
    parser.add_argument("--world-size", type=int, default=None, help="ranks in the job (default: --nproc)")
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    header = sys.stdin.readline()
    env = json.loads(header).get("env", {}) if header.strip() else {}
    signal.signal(signal.SIGHUP, lambda *_: stop_job(args.job_id, KILL_GRACE_SECONDS) or sys.exit(129))
    layout = RankLayout(node_rank=args.node_rank, nnodes=args.nnodes, nproc=args.nproc, first_rank=args.first_rank,
                        world_size=args.world_size or args.nproc, master_addr=args.master_addr,
                        master_port=args.master_port)
    return run(args.job_id, layout, command, env=env, cwd=args.cwd, lifeline_timeout=args.lifeline_timeout, grace=args.grace,
               heartbeat_seconds=args.heartbeat_seconds)


if __name__ == "__main__":
    sys.exit(main())
