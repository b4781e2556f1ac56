"""Prepared data against every rank tokenizing for itself, side by side in one run (2 CPU ranks, one host):

    .venv/bin/python benchmarks/prepared_data.py [--conversations 100000]

A generated chat dataset (messages format, about 300 tokens per conversation with the built-in
character tokenizer) and the built-in tiny model, 3 steps. Three runs:
- today: the rank program under plain torchrun (`python -m deepfleet.train --recipe`): each rank
  reads, renders, tokenizes and labels the whole dataset;
- cold: `deepfleet train` with an empty cache: the head prepares once, the ranks map it;
- warm: `deepfleet train` again: the entry is found, the ranks map it.
Reports seconds to the first step (first `kind: train` record in metrics.jsonl), the prepare time,
and the peak RSS (VmHWM) of each rank process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PYTHON = sys.executable
WORDS = "the a model data rank token batch host step loss train learn fleet node answer question".split()


def write_conversations(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(chars: int) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    with path.open("w") as handle:
        for _ in range(n):
            handle.write(json.dumps({"messages": [{"role": "user", "content": sentence(rng.randint(60, 140))},
                                                  {"role": "assistant", "content": sentence(rng.randint(80, 180))}]})
                         + "\n")


def recipe(work: Path, data: Path, name: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": "builtin:tiny", "method": "full",
        "data": {"train": [str(data)], "max_length": 512, "cache_dir": str(work / "cache")},
        "train": {"max_steps": 3, "global_batch": 8, "micro_batch": 4, "warmup": 1, "seed": 1},
        "deepspeed": {"zero": 2}, "logging": {"tensorboard": False}, "env": {"OMP_NUM_THREADS": "1"},
        "output_dir": str(work / name), "resume": False}))
    return path


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = parent_pid(pid)
    return False


def rank_pids(root: int) -> list[int]:
    """The rank processes started by `root` (not another run's on the same machine)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"deepfleet.train" in (entry / "cmdline").read_bytes() \
                    and b"torch.distributed.run" not in (entry / "cmdline").read_bytes() \
                    and descends_from(int(entry.name), root):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def memory_mib(pid: int) -> tuple[float, float] | None:
    """(peak RSS, private RSS now): VmHWM counts mapped file pages too (the prepared data's page cache,
    shared by every rank on the host and reclaimable); RssAnon is the process's own memory."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmHWM"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def measure(argv: list[str], work: Path, output: Path, *, env: dict[str, str] | None = None,
            timeout: float = 1800) -> dict:
    """Seconds to the first step and the ranks' peak RSS and peak private RSS (ranks this process
    started, the two largest), polled until the run ends; a run past `timeout` is killed."""
    log = output.with_suffix(".out")
    started = time.time()
    with log.open("w") as sink:   # a file, not a pipe: an undrained pipe would stall the run
        # The venv's bin first on PATH, as deepfleet's ranks have it: DeepSpeed JIT-builds its CPU shm op
        # with whichever ninja it finds, and two ninjas rebuild each other's (~25 s, inside the rendezvous).
        path = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "/usr/bin:/bin")])
        process = subprocess.Popen(argv, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **(env or {})},
                                   stdout=sink, stderr=subprocess.STDOUT)
    first_step, peaks, private = None, {}, {}
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            break
        for pid in rank_pids(process.pid):
            memory = memory_mib(pid)
            if memory:
                peaks[pid] = max(peaks.get(pid, 0), memory[0])
                private[pid] = max(private.get(pid, 0), memory[1])
        if first_step is None and metrics.exists() and '"kind": "train"' in metrics.read_text():
            first_step = time.time() - started
        time.sleep(0.05)
    out = log.read_text()
    if process.returncode != 0 or first_step is None:
        raise RuntimeError(f"{argv[:4]} exited {process.returncode}: {out[-2000:]}")
    prepare = next((line for line in out.splitlines() if line.startswith("data: ")), "")
    return {"first_step": first_step, "rss": sorted(peaks.values(), reverse=True)[:2],
            "private": sorted(private.values(), reverse=True)[:2], "prepare": prepare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deepfleet-prepared-") as directory:
        work = Path(directory)
        data = work / "chat.jsonl"
        write_conversations(data, args.conversations)
        print(f"{args.conversations:,} conversations, {data.stat().st_size / 2**20:.0f} MiB", flush=True)
        runs = {
            "today (every rank tokenizes)": measure(
                [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "deepfleet.train",
                 "--recipe", str(recipe(work, data, "today"))], work, work / "today"),
            "prepared, cold cache": measure([PYTHON, "-m", "deepfleet.cli.app", "train",
                                             str(recipe(work, data, "cold"))], work, work / "cold"),
            "prepared, warm cache": measure([PYTHON, "-m", "deepfleet.cli.app", "train",
                                             str(recipe(work, data, "warm"))], work, work / "warm"),
        }
    for name, run in runs.items():
        rss = ", ".join(f"{value:.0f}" for value in run["rss"])
        print(f"{name:<30} first step {run['first_step']:.1f} s   peak RSS per rank (MiB) {rss}   {run['prepare']}")


if __name__ == "__main__":
    main()
