"""`deepfleet sync` against plain scp on a namespace cluster without shared storage (needs root).

    .venv/bin/python benchmarks/sync_speed.py [--gib 1] [--hosts 2,4,8] [--small-files 10000]

Every simulated host shares this machine's 2 cores and ssh encryption is CPU-bound, so wall time
cannot show what fan-out buys on real machines. What scales is measured instead, side by side:

- head egress: bytes the head's own interface (the cluster bridge, whose tx counter sees only
  what the head itself sends, not what hosts forward to each other) sent while syncing the data
  to N hosts, against the N x data a copy to each host costs;
- wall time of the sync against N sequential `scp` runs of the same file;
- a re-sync with nothing changed, of a dir of many small files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))

from namespace_cluster import (HostSpec, build_cluster, fleet_for, missing_prerequisites, on_host,  # noqa: E402
                               teardown_cluster)

from deepfleet.fleet.sync import SyncOptions, run_sync  # noqa: E402

GiB = 2**30


def tx_bytes(interface: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def clear(cluster, names, private: Path) -> None:
    for name in names:
        on_host(cluster, name, f"rm -rf {private}/*  {private}/.[!.]*")


def scp_each(cluster, names, source: Path, private: Path) -> float:
    started = time.monotonic()
    for name in names:
        subprocess.run(["scp", "-q", "-F", str(cluster.ssh_config), str(source),
                        f"root@{cluster.host(name).address}:{private}/"], check=True, timeout=900)
    return time.monotonic() - started


def sync_once(cluster, names, source: Path, private: Path) -> tuple[float, int, str]:
    fleet = fleet_for(cluster, names)
    before = tx_bytes(cluster.bridge)
    started = time.monotonic()
    report = run_sync(fleet, [str(source)], SyncOptions(to=str(private)))
    seconds = time.monotonic() - started
    assert not report.failed, report.error()
    return seconds, tx_bytes(cluster.bridge) - before, report.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--hosts", default="2,4,8")
    parser.add_argument("--small-files", type=int, default=10000)
    args = parser.parse_args()
    reason = missing_prerequisites()
    if reason:
        sys.exit(f"cannot build the cluster: {reason}")
    counts = [int(n) for n in args.hosts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    private = work / "node-local"
    size = int(args.gib * GiB)
    cluster = build_cluster([HostSpec(name=f"b{i}", private_dirs=(str(private),),
                                      private_size=f"{int(args.gib * 1024) + 256}m") for i in range(1, max(counts) + 1)])
    try:
        source = work / "data.bin"
        with open(source, "wb") as handle:
            for _ in range(size // 2**24):
                handle.write(os.urandom(2**24))
        print(f"{args.gib:g} GiB to N hosts (each host a namespace with a private tmpfs; 2 shared cores)")
        print(f"{'N':>3} {'shape':<34} {'head egress':>12} {'N copies':>9} {'sync s':>7} {'N x scp s':>9} {'ratio':>6}")
        for count in counts:
            names = [f"b{i}" for i in range(1, count + 1)]
            clear(cluster, names, private)
            scp_seconds = scp_each(cluster, names, source, private)
            clear(cluster, names, private)
            seconds, egress, shape = sync_once(cluster, names, source, private)
            print(f"{count:>3} {shape:<34} {egress / GiB:>8.2f} GiB {count * size / GiB:>5.1f} GiB "
                  f"{seconds:>7.1f} {scp_seconds:>9.1f} {scp_seconds / seconds:>5.2f}x")
            clear(cluster, names, private)
        source.unlink()

        small = work / "many"
        for index in range(args.small_files):
            (small / f"d{index // 500:03d}").mkdir(parents=True, exist_ok=True)
            (small / f"d{index // 500:03d}" / f"f{index:05d}.txt").write_text(f"file {index}\n")
        names = [f"b{i}" for i in range(1, max(counts) + 1)]
        first, _, _ = sync_once(cluster, names, small, private)
        again = [sync_once(cluster, names, small, private)[0] for _ in range(3)]
        print(f"{args.small_files:,} small files to {len(names)} hosts: first sync {first:.1f} s; "
              f"re-sync with nothing changed {min(again):.2f} s (best of 3; {', '.join(f'{s:.2f}' for s in again)})")
    finally:
        teardown_cluster(cluster)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
