"""`deepfleet bench comm` vs a plain torch.distributed.all_reduce loop on 2 namespace hosts, alternating (not a test).

    .venv/bin/python benchmarks/comm_agreement.py [--rounds 5] [--budget 1.5]   # needs root

Builds a 2-host namespace cluster (tests/cluster/namespace_cluster.py), then per round runs
`deepfleet bench comm --fleet` (supervised launch: host agents, pings, gloo on the chosen interface)
and the plain loop (torchrun over ssh, tests/cluster/plain_all_reduce.py) with the iteration counts
deepfleet chose in a first, untimed run, in alternating order. Prints the all-reduce busbw (nccl-tests' mean
figure; for 2 ranks busbw = algbw) of both per round, their ratio, the median ratio over rounds, and
iperf3 on the same link. Both hosts share this machine's cores, so each figure is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))

from namespace_cluster import build_cluster, fleet_yaml_text, missing_prerequisites, teardown_cluster  # noqa: E402
from plain_all_reduce import iperf3_bits_per_second, plain_all_reduce_seconds  # noqa: E402

DEEPFLEET = str(Path(sys.executable).with_name("deepfleet"))
MiB = 1 << 20
SIZES = (16 * MiB, 64 * MiB)


def deepfleet_busbw(work: Path, budget: float) -> dict[int, dict]:
    done = subprocess.run([DEEPFLEET, "bench", "comm", "--fleet", "fleet.yaml", "--ops", "all_reduce",
                           "--sizes", ",".join(f"{s // MiB}MiB" for s in SIZES), "--budget", str(budget), "--json"],
                          cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"deepfleet bench comm failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {m["size_bytes"]: m for m in report["measurements"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.5, help="deepfleet bench comm --budget (s per size)")
    args = parser.parse_args()
    if reason := missing_prerequisites():
        sys.exit(f"cannot build the namespace cluster: {reason}")
    cluster = build_cluster(2)
    names = [h.name for h in cluster.hosts]
    work = Path(tempfile.mkdtemp(prefix="df-comm-"))
    (work / "fleet.yaml").write_text(fleet_yaml_text(cluster, names))
    ratios: dict[int, list[float]] = {size: [] for size in SIZES}
    try:
        print(f"{os.cpu_count()} CPUs; 2 namespace hosts, 1 gloo rank each; busbw GB/s (mean over the iterations)")
        print(f"{'round':>5} {'size':>8} {'iters':>6} {'deepfleet':>10} {'plain':>8} {'ratio':>7}")
        iterations = {size: m["iterations"] for size, m in deepfleet_busbw(work, args.budget).items()}
        for index in range(args.rounds):
            if index % 2:   # alternate which runs first, so a drift in outside load favours neither
                plain = plain_all_reduce_seconds(cluster, work, names, iterations)
                ours = deepfleet_busbw(work, args.budget)
            else:
                ours = deepfleet_busbw(work, args.budget)
                plain = plain_all_reduce_seconds(cluster, work, names, iterations)
            for size in SIZES:
                plain_busbw = size / plain[size][0]
                ratios[size].append(ours[size]["busbw"] / plain_busbw)
                print(f"{index + 1:>5} {size // MiB:>4} MiB {ours[size]['iterations']:>6} {ours[size]['busbw'] / 1e9:>10.3f} "
                      f"{plain_busbw / 1e9:>8.3f} {ratios[size][-1]:>6.2f}x", flush=True)
        tcp = iperf3_bits_per_second(cluster, names[0], names[1]) / 8
        for size, values in ratios.items():
            within = sum(abs(r - 1) <= 0.10 for r in values)
            print(f"{size // MiB} MiB: deepfleet / plain median {statistics.median(values):.2f}x "
                  f"(range {min(values):.2f}-{max(values):.2f}), within 10% in {within} of {len(values)} rounds")
        print(f"iperf3 {names[0]} -> {names[1]}: {tcp / 1e9:.3f} GB/s")
    finally:
        teardown_cluster(cluster)


if __name__ == "__main__":
    main()
