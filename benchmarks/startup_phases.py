"""Where `deepfleet train` spends its startup: the demo recipe on 2 namespace hosts and on this machine
alone, each with --timings, one after the other in one run (the cluster needs root).

    .venv/bin/python benchmarks/startup_phases.py [--steps 3]

Prints each run's phase table (from logs/attempt-0/startup.json). The namespace hosts' sshd puts
this source tree first on PYTHONPATH, so their agents are this tree's, not the installed one's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))
sys.path.insert(0, str(SRC))

from namespace_cluster import (HostSpec, build_cluster, fleet_yaml_text, missing_prerequisites,  # noqa: E402
                               teardown_cluster)

from deepfleet.cli.train_cmd import DEMO_RECIPE  # noqa: E402

DEEPFLEET = [sys.executable, "-m", "deepfleet.cli.app"]


def train_with_timings(work: Path, name: str, steps: int, *where: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    done = subprocess.run([*DEEPFLEET, "train", str(DEMO_RECIPE), f"train.max_steps={steps}",
                           f"output_dir={work / name}", "logging.tensorboard=false", "data.validation.files=[]",
                           *where, "--timings"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    table = done.stdout[done.stdout.index("startup phases on "):].split("\ndone in ")[0]
    return table + "\n" + (work / name / "logs" / "attempt-0" / "startup.json").read_text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if (why := missing_prerequisites()):
        raise SystemExit(f"cannot build the namespace cluster: {why}")
    cluster = build_cluster([HostSpec(name=name, sshd_options=(f"SetEnv PYTHONPATH={SRC}",)) for name in ("h1", "h2")])
    try:
        with tempfile.TemporaryDirectory(prefix="startup-phases-") as tmp:
            work = Path(tmp)
            (work / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["h1", "h2"]))
            print("2 namespace hosts x 1 rank, over ssh:")
            print(train_with_timings(work, "fleet", args.steps, "--fleet", "fleet.yaml"))
            print("\nthis machine alone, 2 ranks:")
            (work / "alone").mkdir()   # no ./fleet.yaml there
            print(train_with_timings(work / "alone", "local", args.steps, "--nproc", "2"))
    finally:
        teardown_cluster(cluster)


if __name__ == "__main__":
    main()
