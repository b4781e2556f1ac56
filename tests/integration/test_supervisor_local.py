"""The supervisor and host agents on two loopback 'nodes': real ranks + gloo, faults injected."""

import asyncio
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deepfleet.launch.commands import JobSpec, agent_argv, agent_env, new_job_id
from deepfleet.launch.host_agent import job_pids
from deepfleet.launch.supervisor import HostProcess, Supervisor, SupervisorOptions

pytestmark = pytest.mark.integration

WORKER = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    beat = os.environ.get("DEEPFLEET_HEARTBEAT_DIR")
    if beat:
        open(f"{beat}/rank-{os.environ['RANK']}", "w").write(f"-1 {time.time()}")
    for step in range(int(os.environ["STEPS"])):
        t = torch.ones(2); dist.all_reduce(t)
        if beat:
            open(f"{beat}/rank-{dist.get_rank()}", "w").write(f"{step} {time.time()}")
        if step == 2:
            open(f"started-{dist.get_rank()}", "w").close()
        time.sleep(0.2)
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_job(tmp_path: Path, steps: int) -> tuple[JobSpec, list[HostProcess]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    job = JobSpec(job_id=new_job_id(), command=[sys.executable, str(script)], python=sys.executable,
                  workdir=str(tmp_path), master_addr="127.0.0.1", master_port=free_port(), nnodes=2,
                  nproc_per_node=1, env={"STEPS": str(steps), "GLOO_SOCKET_IFNAME": "lo"}, lifeline_timeout=10)
    hosts = [HostProcess(label=f"node{i}", argv=agent_argv(job, node_rank=i), env=agent_env(job)) for i in range(2)]
    return job, hosts


def rank_pid(job: JobSpec, rank: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in job_pids(f"{job.job_id}.{rank}"):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                if Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"worker.py\0"):
                    return pid
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def leftovers(job: JobSpec) -> list[int]:
    return job_pids(f"{job.job_id}.0") + job_pids(f"{job.job_id}.1")


def supervise(hosts, tmp_path, inject, **options):
    supervisor = Supervisor(hosts, SupervisorOptions(log_dir=tmp_path / "logs", **options), write=lambda line: None)
    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    outcome = asyncio.run(supervisor.run())
    injector.join(timeout=5)
    return outcome


def test_clean_run_finishes_with_zero(tmp_path):
    job, hosts = two_node_job(tmp_path, steps=3)
    outcome = supervise(hosts, tmp_path, lambda: None)
    assert outcome.exit_code == 0 and outcome.failure is None
    assert outcome.host_exit_codes == {"node0": 0, "node1": 0}


def test_killed_rank_tears_down_every_node_fast_and_spares_another_job(tmp_path):
    (tmp_path / "other").mkdir()
    other_job, other_hosts = two_node_job(tmp_path / "other", steps=40)
    other = Supervisor(other_hosts, SupervisorOptions(log_dir=tmp_path / "other-logs"), write=lambda line: None)
    other_result = {}
    other_thread = threading.Thread(target=lambda: other_result.update(o=asyncio.run(other.run())), daemon=True)
    other_thread.start()

    job, hosts = two_node_job(tmp_path, steps=400)
    outcome = supervise(hosts, tmp_path, lambda: os.kill(rank_pid(job, 1), signal.SIGKILL))
    assert outcome.failure is not None and (outcome.failure.host, outcome.failure.rank) == ("node1", "1")
    assert outcome.teardown_seconds is not None and outcome.teardown_seconds < 10
    assert leftovers(job) == []
    assert other_thread.is_alive() or other_result["o"].exit_code == 0, "the other job must not be touched"
    other_thread.join(timeout=90)
    assert other_result["o"].exit_code == 0


def test_stopped_rank_is_detected_as_a_hang_and_named(tmp_path):
    job, hosts = two_node_job(tmp_path, steps=400)

    def stop_rank_1():
        pid = rank_pid(job, 1)
        deadline = time.monotonic() + 120
        while not (tmp_path / "started-1").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)

    outcome = supervise(hosts, tmp_path, stop_rank_1, hang_timeout=5)
    assert outcome.failure is not None
    assert (outcome.failure.host, outcome.failure.rank) == ("node1", "1")
    assert "stopped" in outcome.failure.why and not outcome.stopped_by_signal
    assert outcome.teardown_seconds < 10 and leftovers(job) == []
