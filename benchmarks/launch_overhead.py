"""Launch overhead and fault teardown on a 2-host namespace cluster, side by side in one run (needs root).

    .venv/bin/python benchmarks/launch_overhead.py [--repeats 3]

1. Seconds from command to the first training step (an all-reduce every rank does right after
   init_process_group): `deepfleet launch` vs DeepSpeed's own `deepspeed` launcher (pdsh) on the
   same hosts, same worker, alternating runs. Prints both medians and the ratio (goal <= 1.05).
2. For each fault kind, seconds from the fault to the launcher's exit with every host clean, and the
   supervisor's own "detected -> torn down" figure.
All hosts share this machine's clock, so the worker's time.time() compares directly with ours.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))

from namespace_cluster import build_cluster, fleet_yaml_text, missing_prerequisites, teardown_cluster  # noqa: E402

PYTHON = sys.executable
WORKER = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    beat = os.environ.get("DEEPFLEET_HEARTBEAT_DIR")
    dist.init_process_group("gloo")
    steps = int(sys.argv[-1])
    for step in range(steps):
        t = torch.ones(2); dist.all_reduce(t)
        if step == 0 and dist.get_rank() == 0:
            print(f"FIRST_STEP {time.time():.3f}", flush=True)
        if beat:
            open(f"{beat}/rank-{dist.get_rank()}", "w").write(f"{step} {time.time()}")
        if step == 2:
            open(f"started-{dist.get_rank()}", "w").write(str(os.getpid()))
        time.sleep(0.2 if steps > 1 else 0)
    dist.destroy_process_group()
""")
FAULTS = ["kill -9 rank", "kill -STOP rank", "link down", "SIGTERM launcher"]


def deepfleet_argv(port: int, steps: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "deepfleet.cli.app", "launch", "--fleet", "fleet.yaml", "--master-port", str(port),
            "--run-dir", "run", *extra, "--", "python", "worker.py", str(steps)]


def deepspeed_argv(cluster, work: Path, port: int) -> tuple[list[str], dict[str, str]]:
    hosts = [h for h in cluster.hosts if h.name in ("h1", "h2")]
    (work / "hostfile").write_text("".join(f"{h.address} slots=1\n" for h in hosts))
    (work / "ds_env").write_text("GLOO_SOCKET_IFNAME=eth0\n")
    env = {"DS_ENV_FILE": str(work / "ds_env"), "PDSH_SSH_ARGS_APPEND": f"-F {cluster.ssh_config}"}
    argv = [PYTHON, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--launcher", "pdsh",
            "--master_addr", hosts[0].address, "--master_port", str(port), "--no_ssh_check", "worker.py", "1"]
    return argv, env


def seconds_to_first_step(argv: list[str], work: Path, env: dict[str, str]) -> float:
    started = time.time()
    done = subprocess.run(argv, cwd=work, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    stamps = [float(m) for m in re.findall(r"FIRST_STEP (\d+\.\d+)", done.stdout + done.stderr)]
    if done.returncode != 0 or not stamps:
        raise RuntimeError(f"{argv[2]} failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    return min(stamps) - started


def measure_overhead(cluster, work: Path, repeats: int) -> None:
    ours, theirs = [], []
    for run in range(repeats):
        ours.append(seconds_to_first_step(deepfleet_argv(29800 + run, 1), work, {}))
        argv, env = deepspeed_argv(cluster, work, 29850 + run)
        theirs.append(seconds_to_first_step(argv, work, env))
        print(f"  run {run}: deepfleet {ours[-1]:.2f}s  deepspeed {theirs[-1]:.2f}s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"command -> first step, median of {repeats}: deepfleet {a:.2f}s, deepspeed launcher {b:.2f}s, "
          f"ratio {a / b:.3f} (goal <= 1.05)")


def rank_pid(work: Path, rank: int, seconds: float = 120) -> int:
    marker = work / f"started-{rank}"
    deadline = time.monotonic() + seconds
    while not marker.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank} never reached step 2")
        time.sleep(0.1)
    return int(marker.read_text())


def measure_fault(cluster, work: Path, fault: str, port: int) -> None:
    for marker in work.glob("started-*"):
        marker.unlink()
    process = subprocess.Popen(deepfleet_argv(port, 5000, "--hang-timeout", "10"), cwd=work,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid, veth = rank_pid(work, 1), cluster.host("h2").veth
    started = time.monotonic()
    try:
        if fault == "kill -9 rank":
            os.kill(pid, signal.SIGKILL)
        elif fault == "kill -STOP rank":
            os.kill(pid, signal.SIGSTOP)
        elif fault == "link down":
            subprocess.run(["ip", "link", "set", veth, "down"], check=True, timeout=10)
        else:
            process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
        total = time.monotonic() - started
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=False, timeout=10)
        if fault == "kill -STOP rank":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    teardown = re.search(r"torn down on every host ([\d.]+)s after detection", out)
    shown = f"{float(teardown.group(1)):.1f}s" if teardown else "n/a (graceful stop)"
    print(f"  {fault:<18} fault -> launcher exit {total:5.1f}s   detection -> torn down {shown}   "
          f"exit code {process.returncode}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if reason := missing_prerequisites():
        print(f"cannot build the namespace cluster: {reason}")
        return 2
    cluster = build_cluster(2)
    try:
        work = Path(tempfile.mkdtemp(prefix="launch-bench-", dir=cluster.root))
        (work / "worker.py").write_text(WORKER)
        (work / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["h1", "h2"]))
        print(f"2-host namespace cluster on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
        measure_overhead(cluster, work, args.repeats)
        print("fault -> teardown (hang timeout 10 s, link timeout 15 s):")
        for number, fault in enumerate(FAULTS):
            measure_fault(cluster, work, fault, 29900 + number)
    finally:
        teardown_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
