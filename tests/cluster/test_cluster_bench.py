"""`deepfleet bench comm` on 2 namespace hosts: its all-reduce busbw agrees with a minimal torch loop, next to iperf3.

Three measurements on the same veth link, in one test (the plain loop runs before and after deepfleet's):
- deepfleet bench comm --fleet (the supervised launcher, gloo over the chosen interface);
- a minimal `torch.distributed.all_reduce` timing loop under plain torchrun started over ssh;
- iperf3 from h1's namespace to h2's: the raw TCP throughput of the link.
All hosts share this machine's 2 cores, so gloo and iperf3 are both CPU-bound: the ratio to TCP is
what this link gives, not a property of real networks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_support import skip_or_fail
from namespace_cluster import fleet_yaml_text
from plain_all_reduce import iperf3_bits_per_second, plain_all_reduce_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from training_fixtures import DEEPFLEET  # noqa: E402

pytestmark = pytest.mark.cluster

MiB = 1 << 20
SIZES = [16 * MiB, 64 * MiB]
# nccl-tests' figure (mean busbw) at the larger size, against the faster of the two plain runs: other
# load on the shared cores only ever slows a run down. The issue asks for agreement within 10%;
# benchmarks/comm_agreement.py measures that over alternating rounds (benchmarks/RESULTS.md). One
# pair of runs on 2 shared cores varies more than that, so this test guards against gross errors (a
# wrong busbw formula is off by 2x) and prints the ratio.
COMPARED_SIZE = 64 * MiB
AGREEMENT = 0.40
# About as many iterations as deepfleet's 1.5 s budget gives at each size on this machine.
PLAIN_ITERATIONS = {16 * MiB: 40, 64 * MiB: 15}


def test_comm_busbw_agrees_with_plain_torch_and_is_shown_next_to_tcp(namespace_cluster, tmp_path):
    if not shutil.which("iperf3"):
        skip_or_fail("iperf3 not installed (scripts/install-os-deps.sh)")
    names = ["h1", "h2"]
    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, names))
    # Other load on the shared cores drifts: bracket deepfleet's run with a reference run before and after.
    before = plain_all_reduce_seconds(namespace_cluster, tmp_path, names, PLAIN_ITERATIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([DEEPFLEET, "bench", "comm", "--fleet", "fleet.yaml", "--ops", "all_reduce",
                           "--sizes", ",".join(f"{s // MiB}MiB" for s in SIZES), "--budget", "1.5", "--json",
                           "--png", "comm.png"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["backend"] == "gloo" and report["n_ranks"] == 2 and report["n_hosts"] == 2
    ours = {m["size_bytes"]: m for m in report["measurements"] if m["operation"] == "all_reduce"}
    assert sorted(ours) == SIZES
    assert (tmp_path / "comm.png").is_file()
    assert (tmp_path / "runs" / "bench").is_dir()

    after = plain_all_reduce_seconds(namespace_cluster, tmp_path, names, PLAIN_ITERATIONS)
    tcp = iperf3_bits_per_second(namespace_cluster, "h1", "h2") / 8

    # n=2: busbw = algbw x 2(n-1)/n = algbw.
    plain = {size: size / min(before[size][0], after[size][0]) for size in SIZES}
    lines = [f"{'size':>8} {'deepfleet busbw':>16} {'plain torch busbw':>18} {'ratio':>6}"]
    for size in SIZES:
        lines.append(f"{size // MiB:>5} MiB {ours[size]['busbw'] / 1e9:>11.3f} GB/s {plain[size] / 1e9:>13.3f} GB/s "
                     f"{ours[size]['busbw'] / plain[size]:>6.2f}")
    lines.append(f"iperf3 TCP h1->h2: {tcp / 1e9:.3f} GB/s; all-reduce busbw at {COMPARED_SIZE // MiB} MiB is "
                 f"{ours[COMPARED_SIZE]['busbw'] / tcp:.0%} of it")
    print("\n" + "\n".join(lines))

    ours_busbw, plain_busbw = ours[COMPARED_SIZE]["busbw"], plain[COMPARED_SIZE]
    assert abs(ours_busbw - plain_busbw) <= AGREEMENT * plain_busbw, "\n".join(lines)
    assert 0 < ours_busbw < 2 * tcp, "\n".join(lines)   # gloo over TCP cannot beat the link by far


def test_bench_train_scaling_table_on_one_and_two_hosts(namespace_cluster, tmp_path):
    from training_fixtures import write_recipe, write_task_data

    (tmp_path / "fleet.yaml").write_text(fleet_yaml_text(namespace_cluster, ["h1", "h2"]))
    train, _ = write_task_data(tmp_path / "data", n_train=240, n_validation=8)
    # One thread per rank: every namespace host shares this machine's 2 cores.
    recipe = write_recipe(tmp_path / "scaling.yaml", model="builtin:tiny", method="full",
                          data={"train": [str(train)], "max_length": 64, "packing": True},
                          train={"global_batch": 8, "micro_batch": 4, "lr": 2e-3, "warmup": 1, "seed": 3},
                          deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
                          output_dir=str(tmp_path / "scaling"))
    done = subprocess.run([DEEPFLEET, "bench", "train", str(recipe), "--nodes", "1,2", "--fleet", "fleet.yaml",
                           "--steps", "6", "--warmup-steps", "2", "--json", "--png", "scaling.png"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = json.loads(done.stdout)       # stdout holds only the JSON
    print(f"\n1 node {one['tokens_per_second']:,.0f} tok/s, 2 nodes {two['tokens_per_second']:,.0f} tok/s, "
          f"efficiency {two['scaling_efficiency']:.0%}; per host {two['hosts']}")
    assert (one["nodes"], one["ranks"], two["nodes"], two["ranks"]) == (1, 1, 2, 2)
    assert [h["host"] for h in two["hosts"]] == ["h1", "h2"]
    assert one["scaling_efficiency"] == pytest.approx(1.0)
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_second"] / (2 * one["tokens_per_second"]))
    assert all(r["tokens_per_second"] > 0 and 0 < r["mfu"] <= 1 for r in (one, two))   # above 1: a wrong peak
    assert all(r["mfu_peak"].startswith("measured fp32 matmul 1024x1024 (CPU): ") for r in (one, two))
    assert (tmp_path / "scaling" / "bench-nodes-2" / "logs" / "attempt-0" / "h2.log").is_file()
    assert (tmp_path / "scaling.png").is_file()
