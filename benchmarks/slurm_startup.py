"""Seconds from submission to the first training step on 2 real SLURM nodes (needs root and
slurm-wlm/munge, scripts/install-os-deps.sh), side by side in one run:

    .venv/bin/python benchmarks/slurm_startup.py [--repeats 3] [--nodes 2]

- `deepfleet train RECIPE --slurm --nodes N` (submits, the job probes its nodes, picks the
  interface, starts one supervised host agent per node as an srun step, which starts its ranks);
- the hand-written batch script of seed 001: sbatch, MASTER_ADDR from `scontrol show hostnames`,
  a guessed GLOO_SOCKET_IFNAME, `srun torchrun --node_rank=$SLURM_NODEID`, the same rank program
  (`python -m deepfleet.train --recipe`) on the same recipe.

Alternating runs; the first step is the first `kind: train` record in metrics.jsonl (every
process shares this machine's clock). Prints both medians and the ratio (goal <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "cluster"), str(ROOT / "tests" / "integration")]

from namespace_cluster import HostSpec, build_cluster, missing_prerequisites, teardown_cluster  # noqa: E402
from slurm_cluster import missing_slurm_prerequisites, start_slurm, stop_slurm  # noqa: E402
from training_fixtures import write_recipe, write_task_data  # noqa: E402

PYTHON = sys.executable
STEPS = 3


def recipe(work: Path, name: str) -> Path:
    train, _ = write_task_data(work / "data", n_train=160, n_validation=4)
    return write_recipe(work / f"{name}.yaml", model="builtin:tiny", method="full",
                        data={"train": [str(train)], "max_length": 64},
                        train={"max_steps": STEPS, "global_batch": 4, "micro_batch": 2, "warmup": 1, "seed": 3},
                        deepspeed={"zero": 2}, logging={"tensorboard": False}, env={"OMP_NUM_THREADS": "1"},
                        checkpoint={"every_steps": 1000}, output_dir=str(work / name))


def hand_written_script(recipe_path: Path, nodes: int, port: int) -> str:
    torchrun = (f"exec {shlex.quote(PYTHON)} -m torch.distributed.run --nnodes=$SLURM_JOB_NUM_NODES "
                f"--node_rank=$SLURM_NODEID --nproc_per_node=1 --master_addr=$MASTER_ADDR --master_port={port} "
                f"-m deepfleet.train --recipe {shlex.quote(str(recipe_path))}")
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={recipe_path.parent}/hand-%j.log",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1",
        f"srun bash -c {shlex.quote(torchrun)}",
        ""])


def first_step_at(output: Path, started: float, timeout: float = 600) -> float:
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("kind") == "train"
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return time.time() - started
        time.sleep(0.05)
    raise TimeoutError(f"no training step in {metrics} after {timeout}s")


def wait_idle(slurm) -> None:
    slurm.wait_nodes("idle", timeout=120)


def run_deepfleet(slurm, work: Path, name: str, nodes: int) -> float:
    path = recipe(work, name)
    started = time.time()
    head = subprocess.Popen([PYTHON, "-m", "deepfleet.cli.app", "train", str(path), "--slurm", f"--nodes={nodes}"],
                            cwd=work, env=slurm.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = first_step_at(work / name, started)
    out, _ = head.communicate(timeout=600)
    if head.returncode != 0:
        raise RuntimeError(f"deepfleet train --slurm exited {head.returncode}: {out[-2000:]}")
    wait_idle(slurm)
    return seconds


def run_hand_written(slurm, work: Path, name: str, nodes: int, port: int) -> float:
    path = recipe(work, name)
    script = work / f"{name}.sbatch"
    script.write_text(hand_written_script(path, nodes, port))
    started = time.time()
    job = int(slurm.sbatch(str(script), cwd=work))
    seconds = first_step_at(work / name, started)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    if info["JobState"] != "COMPLETED":
        raise RuntimeError(f"hand-written job {job}: {info['JobState']}: {(work / f'hand-{job}.log').read_text()[-2000:]}")
    wait_idle(slurm)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    reason = missing_prerequisites() or missing_slurm_prerequisites()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    cluster = build_cluster([HostSpec(name=f"n{i + 1}") for i in range(args.nodes)])
    slurm = start_slurm(cluster)
    # The venv's bin first on PATH for both, as deepfleet's ranks have it: DeepSpeed JIT-builds its CPU
    # shm op with whichever ninja it finds, and the venv's and /usr/bin's rebuild each other's (~25 s
    # inside init_process_group), which alternating runs would otherwise pay every time.
    slurm.env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), slurm.env["PATH"]])
    ours, theirs = [], []
    try:
        work = slurm.root / "tmp"
        for repeat in range(args.repeats):
            theirs.append(run_hand_written(slurm, work, f"hand{repeat}", args.nodes, 29500 + repeat))
            ours.append(run_deepfleet(slurm, work, f"fleet{repeat}", args.nodes))
            print(f"run {repeat + 1}: deepfleet train --slurm {ours[-1]:.1f} s, hand-written sbatch {theirs[-1]:.1f} s",
                  flush=True)
    finally:
        stop_slurm(slurm)
        teardown_cluster(cluster)
    mine, hand = statistics.median(ours), statistics.median(theirs)
    print(f"seconds to the first step on {args.nodes} SLURM nodes, median of {args.repeats}: "
          f"deepfleet train --slurm {mine:.1f} s, hand-written sbatch + srun + torchrun {hand:.1f} s, "
          f"ratio {mine / hand:.2f} (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
