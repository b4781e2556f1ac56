"""`deepfleet train` against DeepSpeed's own launcher: seconds from the command to the first training
step on a 2-host namespace cluster (needs root), same model, recipe and data, alternating runs:

    .venv/bin/python benchmarks/train_startup.py [--repeats 3] [--conversations 200000]

- deepfleet: `deepfleet train RECIPE --fleet fleet.yaml` (probe, plan, prepare the data on the
  head once, ssh + host agents that start the ranks, the ranks map the prepared data). Its first run has a
  cold cache (prepared data, and the model facts the head computes through transformers); later
  runs find both (warm).
- DeepSpeed: `deepspeed --hostfile ... --launcher pdsh --module deepfleet.train --recipe RECIPE`:
  the same rank program, each rank reading and tokenizing the data itself (what the launcher offers).
Two data sets: the demo recipe (built-in tasks), then `--conversations` generated chat conversations
(about 300 tokens each; 0 skips it). One CPU rank per host. The first step is the first `kind: train`
record in metrics.jsonl (all hosts share this machine's clock and files). Goal: ratio <= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "cluster"), str(ROOT / "benchmarks")]

from namespace_cluster import build_cluster, fleet_yaml_text, missing_prerequisites, teardown_cluster  # noqa: E402
from prepared_data import measure, write_conversations  # noqa: E402

PYTHON = sys.executable
DEMO = ROOT / "src" / "deepfleet" / "assets" / "demo.yaml"


def write_recipe(work: Path, name: str, data: Path | None) -> Path:
    """The demo recipe (or the same with the chat data), 3 steps, one rank per host."""
    recipe = yaml.safe_load(DEMO.read_text())
    if data is not None:
        recipe["data"] = {"train": [str(data)], "max_length": 512}
    recipe["data"]["cache_dir"] = str(work / "cache")
    recipe["train"].update(max_steps=3, global_batch=4, micro_batch=2, warmup=1)
    recipe.update(output_dir=str(work / name), resume=False, logging={"tensorboard": False},
                  env={"OMP_NUM_THREADS": "1"})
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def deepspeed_run(cluster, work: Path, recipe: Path, port: int) -> tuple[list[str], dict[str, str]]:
    hosts = [cluster.host(name) for name in ("h1", "h2")]
    (work / "hostfile").write_text("".join(f"{h.address} slots=1\n" for h in hosts))
    # The venv's bin first on PATH, as deepfleet's ranks have it: DeepSpeed JIT-builds its CPU shm op
    # with whichever ninja it finds, and the venv's and /usr/bin's rebuild each other's (30-60 s).
    path = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    (work / "ds_env").write_text(f"GLOO_SOCKET_IFNAME=eth0\nOMP_NUM_THREADS=1\nPATH={path}\n")
    argv = [PYTHON, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile", "--launcher", "pdsh",
            "--master_addr", hosts[0].address, "--master_port", str(port), "--no_ssh_check", "--no_local_rank",
            "--module", "deepfleet.train", "--recipe", str(recipe)]
    return argv, {"DS_ENV_FILE": str(work / "ds_env"), "PDSH_SSH_ARGS_APPEND": f"-F {cluster.ssh_config}"}


def compare(cluster, work: Path, label: str, data: Path | None, repeats: int) -> None:
    ours, theirs = [], []
    for run in range(repeats):
        name = f"{label}-deepspeed-{run}"
        argv, env = deepspeed_run(cluster, work, write_recipe(work, name, data), 29600 + run)
        theirs.append(measure(argv, work, work / name, env=env)["first_step"])
        name = f"{label}-deepfleet-{run}"
        argv = [PYTHON, "-m", "deepfleet.cli.app", "train", str(write_recipe(work, name, data)), "--fleet", "fleet.yaml"]
        ours.append(measure(argv, work, work / name, env={"XDG_CACHE_HOME": str(work / "xdg")})["first_step"])
        print(f"  {label} run {run + 1}: deepspeed {theirs[-1]:.1f} s, deepfleet {ours[-1]:.1f} s"
              f"{' (cold data cache)' if run == 0 else ''}", flush=True)
    warm = ours[1:] or ours
    a, b = statistics.median(warm), statistics.median(theirs)
    print(f"{label}: command -> first step, median of {repeats}: deepfleet {a:.1f} s (warm cache; cold {ours[0]:.1f} s), "
          f"deepspeed launcher {b:.1f} s, ratio {a / b:.2f} (goal <= 0.9)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=200_000)
    args = parser.parse_args()
    if reason := missing_prerequisites():
        print(f"cannot build the namespace cluster: {reason}")
        return 2
    cluster = build_cluster(2)
    try:
        work = Path(tempfile.mkdtemp(prefix="startup-bench-", dir=cluster.root))
        (work / "fleet.yaml").write_text(fleet_yaml_text(cluster, ["h1", "h2"]))
        print(f"2-host namespace cluster on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        compare(cluster, work, "demo", None, args.repeats)
        if args.conversations:
            data = work / "chat.jsonl"
            write_conversations(data, args.conversations)
            compare(cluster, work, f"{args.conversations:,} conversations", data, args.repeats)
    finally:
        teardown_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
