"""doctor wall time on 2 vs 8 namespace hosts, measured side by side in one run (needs root).

    .venv/bin/python benchmarks/doctor_scaling.py [--repeats 3] [--hosts 8]

Builds one namespace cluster (tests/cluster/namespace_cluster.py) with N hosts, then alternates
doctor runs over its first 2 hosts and over all N, each with a fresh ControlMaster dir (a cold
first run, as a user sees it). Prints the median wall seconds, the CPU seconds the whole
machine spent (from /proc/stat, so other load on the machine shows up there too), and the N/2
ratio, for the default doctor and with the host->host matrix / iperf3 turned off.
All simulated hosts share this machine's cores, so CPU-bound work cannot overlap as it does on
N real machines: the CPU column shows how much of the wall time that explains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))

from namespace_cluster import build_cluster, fleet_for, missing_prerequisites, teardown_cluster  # noqa: E402

from deepfleet.fleet.doctor import DoctorOptions, run_doctor  # noqa: E402
from deepfleet.fleet.ssh import SshOptions  # noqa: E402


def busy_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


MODES = {  # label -> DoctorOptions fields
    "default": {},
    "--no-matrix": {"matrix": False},
    "--no-matrix --no-iperf3": {"matrix": False, "iperf3": False},
}


def one_run(cluster, names: list[str], mode: dict, run: int) -> tuple[float, float, bool]:
    control = cluster.root / f"cm{run}"
    control.mkdir(mode=0o700)
    ssh = SshOptions(config_file=str(cluster.ssh_config), connect_timeout=3, control_dir=str(control),
                     control_persist_seconds=2)
    cpu = busy_cpu_seconds()
    report = run_doctor(fleet_for(cluster, names), DoctorOptions(output_dir=str(cluster.root), **mode), ssh)
    cpu = busy_cpu_seconds() - cpu
    failed = [f"{f.host}: {f.message}" for f in report.findings if f.severity == "fail"]
    if failed:
        print("  unexpected failures:", failed)
    time.sleep(2.5)   # let this run's ControlPersist masters exit before the next run
    shutil.rmtree(control, ignore_errors=True)
    return report.seconds, cpu, not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=8)
    args = parser.parse_args()
    if reason := missing_prerequisites():
        sys.exit(f"cannot build the namespace cluster: {reason}")
    cluster = build_cluster(args.hosts)
    try:
        names = [h.name for h in cluster.hosts]
        print(f"{os.cpu_count()} CPUs; doctor, median of {args.repeats} cold runs each, alternating")
        print(f"{'mode':<26}{'hosts':>6}{'wall s':>9}{'cpu s':>8}{'ratio':>8}")
        run = 0
        for label, mode in MODES.items():
            samples: dict[int, list[tuple[float, float]]] = {2: [], args.hosts: []}
            for _ in range(args.repeats):
                for count in (2, args.hosts):
                    run += 1
                    wall, cpu, _ok = one_run(cluster, names[:count], mode, run)
                    samples[count].append((wall, cpu))
            base = statistics.median(w for w, _ in samples[2])
            for count, values in samples.items():
                wall = statistics.median(w for w, _ in values)
                cpu = statistics.median(c for _, c in values)
                print(f"{label:<26}{count:>6}{wall:>9.2f}{cpu:>8.2f}{wall / base:>8.2f}", flush=True)
    finally:
        teardown_cluster(cluster)


if __name__ == "__main__":
    main()
