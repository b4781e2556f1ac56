"""The reference for `deepfleet bench comm`: a minimal torch.distributed.all_reduce timing loop under
plain torchrun started over ssh, and iperf3 between two namespaces (used by the cluster test and by
benchmarks/comm_agreement.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from namespace_cluster import Cluster

SCRIPT = textwrap.dedent("""
    import json, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    results = {}
    for item in sys.argv[1:]:
        size, iterations = map(int, item.split(":"))
        x = torch.ones(size // 4)
        for _ in range(3):
            dist.all_reduce(x)                   # warm-up
        dist.barrier()
        start = last = time.perf_counter()
        best = float("inf")
        for _ in range(iterations):
            dist.all_reduce(x)
            now = time.perf_counter()
            best, last = min(best, now - last), now
        t = torch.tensor([(last - start) / iterations, best], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        results[size] = t.tolist()
    if dist.get_rank() == 0:
        print("REFERENCE " + json.dumps(results), flush=True)
    dist.destroy_process_group()
""")


def plain_all_reduce_seconds(cluster: Cluster, workdir: Path, names: list[str], iterations: dict[int, int],
                             ) -> dict[int, tuple[float, float]]:
    """{size: (mean, fastest) seconds per all-reduce on the slowest rank}: plain torchrun on each host over
    ssh, one rank per host, GLOO_SOCKET_IFNAME=eth0, OMP_NUM_THREADS=1, master on the first host."""
    script = workdir / "plain_all_reduce.py"
    script.write_text(SCRIPT)
    master = cluster.host(names[0]).address
    port = random.randint(30000, 39999)
    sizes = " ".join(f"{size}:{count}" for size, count in iterations.items())
    procs = []
    for node_rank, name in enumerate(names):
        remote = (f"cd {workdir} && GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 {sys.executable} -m "
                  f"torch.distributed.run --nnodes={len(names)} --node-rank={node_rank} --nproc-per-node=1 "
                  f"--master-addr={master} --master-port={port} {script} {sizes}")
        procs.append(subprocess.Popen(["ssh", "-F", str(cluster.ssh_config), cluster.host(name).address, remote],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    line = next(line for line in outputs[0].splitlines() if line.startswith("REFERENCE "))
    return {int(size): tuple(times) for size, times in json.loads(line[len("REFERENCE "):]).items()}


def iperf3_bits_per_second(cluster: Cluster, client: str, server: str) -> float:
    """A one-off iperf3 server in `server`'s namespace, the client in `client`'s; a few attempts at most."""
    address = cluster.host(server).address
    in_server = ["ip", "netns", "exec", cluster.host(server).namespace]
    in_client = ["ip", "netns", "exec", cluster.host(client).namespace]
    failures = []
    for _ in range(4):
        port = str(random.randint(40000, 49999))
        server_proc = subprocess.Popen([*in_server, "iperf3", "-s", "-1", "-B", address, "-p", port],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)   # let it listen; probing the port would use up its one test
            done = subprocess.run([*in_client, "iperf3", "-c", address, "-p", port, "-t", "2", "-J"],
                                  capture_output=True, text=True, timeout=20)
            result = json.loads(done.stdout or "{}")
            if done.returncode == 0 and "sum_received" in result.get("end", {}):
                return result["end"]["sum_received"]["bits_per_second"]
            failures.append(result.get("error") or done.stderr[-200:])
        finally:
            server_proc.kill()
            server_proc.wait(timeout=10)
    raise AssertionError(f"iperf3 failed: {failures}")
