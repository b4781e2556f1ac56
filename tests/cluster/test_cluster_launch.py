"""`deepfleet launch` across namespace hosts: one job over ssh, faults torn down on every host, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from namespace_cluster import Cluster, fleet_yaml_text

pytestmark = pytest.mark.cluster

HOSTS = ["h1", "h2"]
SECRET = "hf_do_not_leak_7f3a"
JOB_PROCESS_WORDS = (b"deepfleet.launch.host_agent", b"deepfleet.launch.rendezvous_store", b"worker.py")
WORKER = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    beat = os.environ.get("DEEPFLEET_HEARTBEAT_DIR", ".")
    rank = os.environ["RANK"]
    open(f"{beat}/rank-{rank}", "w").write(f"-1 {time.time()}")
    dist.init_process_group("gloo")
    for step in range(int(sys.argv[-1])):  # the deepspeed backend inserts --local_rank first
        t = torch.ones(2); dist.all_reduce(t)
        open(f"{beat}/rank-{rank}", "w").write(f"{step} {time.time()}")
        if step == 2:
            open(f"started-{rank}", "w").write(str(os.getpid()))
        time.sleep(0.2)
    print(f"rank {rank} world {dist.get_world_size()} sum {t[0].item()} secret_seen {os.environ.get('HF_TOKEN') == '%s'}")
    dist.destroy_process_group()
""" % SECRET)


def job_processes(cluster: Cluster, name: str) -> list[tuple[int, bytes]]:
    found = []
    for pid in cluster.namespace_pids(name):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(word in cmdline for word in JOB_PROCESS_WORDS):
            found.append((pid, cmdline))
    return found


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


@pytest.fixture
def job_dir(namespace_cluster: Cluster, tmp_path: Path) -> Path:
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, HOSTS))
    return tmp_path


def start_launch(job_dir: Path, steps: int, port: int, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "deepfleet.cli.app", "launch", "--fleet", "fleet.yaml", "--master-port", str(port),
            "--run-dir", "run", "--all-logs", *extra, "--", "python", "worker.py", str(steps)]
    env = {**os.environ, "HF_TOKEN": SECRET}
    return subprocess.Popen(argv, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, seconds: float = 120) -> str:
    out, _ = process.communicate(timeout=seconds)
    return out


def rank_pid(job_dir: Path, rank: int) -> int:
    marker = job_dir / f"started-{rank}"
    wait_for(marker.exists, 120, f"rank {rank} to reach step 2")
    return int(marker.read_text())


def assert_no_orphans(cluster: Cluster) -> None:
    wait_for(lambda: not any(job_processes(cluster, n) for n in HOSTS), 10, "job processes to be gone")


def test_one_job_across_hosts_with_secret_only_in_environment(namespace_cluster, job_dir):
    process = start_launch(job_dir, 30, 29701)
    pid = rank_pid(job_dir, 1)
    master = namespace_cluster.host("h1")
    listeners = subprocess.run(["ip", "netns", "exec", master.namespace, "ss", "-ltnH", "sport = :29701"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    assert [line.split()[3] for line in listeners if line] == [f"{master.address}:29701"], \
        "the rendezvous must listen on the master's private address only"
    for name in HOSTS:
        for _, cmdline in job_processes(namespace_cluster, name):
            assert SECRET.encode() not in cmdline, "a secret reached a command line"
    assert SECRET.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    out = finish(process)
    assert process.returncode == 0, out
    assert "h2/[1]:rank 1 world 2 sum 2.0 secret_seen True" in out
    assert SECRET not in out and SECRET not in (job_dir / "run" / "logs" / "attempt-0" / "h1.log").read_text()
    assert_no_orphans(namespace_cluster)


@pytest.mark.parametrize("fault", ["kill-rank", "stop-rank", "cut-link", "sigterm-launcher"])
def test_fault_tears_down_every_host(namespace_cluster, job_dir, fault, tmp_path_factory):
    survivor = None
    if fault == "kill-rank":   # a second job on the same hosts must outlive the first one's teardown
        other_dir = tmp_path_factory.mktemp("other")
        (other_dir / "worker.py").write_text(WORKER)
        (other_dir / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, HOSTS))
        survivor = start_launch(other_dir, 2000, 29711)
        rank_pid(other_dir, 0)
    process = start_launch(job_dir, 2000, 29702, "--hang-timeout", "8")
    pid = rank_pid(job_dir, 1)
    veth = namespace_cluster.host("h2").veth
    started = time.monotonic()
    if fault == "kill-rank":
        os.kill(pid, signal.SIGKILL)
    elif fault == "stop-rank":
        os.kill(pid, signal.SIGSTOP)
    elif fault == "cut-link":
        subprocess.run(["ip", "link", "set", veth, "down"], check=True, timeout=10)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        out = finish(process, 90)
        elapsed = time.monotonic() - started
        assert process.returncode != 0, out
        if fault != "sigterm-launcher":
            assert "job failed: first failure on h2" in out, out
        # A killed rank's peers may fail and exit on their own before the head tears them down.
        stopped_alone = fault == "kill-rank" and "every other host had already stopped by itself" in out
        assert "torn down on every host" in out or stopped_alone or fault == "sigterm-launcher", out
        if fault == "stop-rank":
            assert "rank 1" in out and "stopped" in out
        # Detection (hang timeout 8 s, link timeout 15 s) plus teardown within 10 s.
        assert elapsed < 40, f"{fault}: {elapsed:.1f}s from fault to exit"
        if survivor:
            time.sleep(3)
            assert survivor.poll() is None, "the other job was killed by the first job's teardown"
        stop_survivor(survivor)
        assert_no_orphans(namespace_cluster)
    finally:
        stop_survivor(survivor)   # a failed assertion above must not leave it running into the next test
        subprocess.run(["ip", "link", "set", veth, "up"], check=False, timeout=10)
        if fault == "stop-rank":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def stop_survivor(survivor) -> None:
    if survivor is not None and survivor.poll() is None:
        survivor.send_signal(signal.SIGTERM)
        finish(survivor, 60)


def test_deepspeed_backend_runs_across_hosts_with_generated_env_file(namespace_cluster, job_dir):
    argv = [sys.executable, "-m", "deepfleet.cli.app", "launch", "--backend", "deepspeed", "--fleet", "fleet.yaml",
            "--master-port", "29721", "--run-dir", "dsrun", "--", "python", "worker.py", "3"]
    done = subprocess.run(argv, cwd=job_dir, env={**os.environ, "HF_TOKEN": SECRET}, capture_output=True,
                          text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "rank 1 world 2 sum 2.0" in out, "both hosts must join one job"
    env_file = (job_dir / "dsrun" / "deepspeed_env").read_text()
    assert "GLOO_SOCKET_IFNAME=eth0" in env_file and SECRET not in env_file
    assert "HF_TOKEN not exported" in out and SECRET not in out
