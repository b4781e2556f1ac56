"""Prepare over the head's cores, and data scaling on CPU ranks of one host (issue 17):

    .venv/bin/python benchmarks/data_scaling.py [--conversations 1000000] [--compare 100000] [--today 50000]

Generated chat conversations (benchmarks/prepared_data.py: messages format, about 300 tokens each
with the built-in character tokenizer), the built-in tiny model, 3 steps.
1. (--compare 0: skipped) `deepfleet prepare` of --compare conversations with data.prepare_workers=1 and =2, side by side
   (wall seconds of the whole command), and the two entries compared byte for byte.
2. --conversations: `deepfleet prepare` (one worker per core), then `deepfleet train` on the warm
   cache with 1 rank and with 2 ranks: seconds to the first step and every rank's peak RSS; and the
   same with 1,000 conversations, the rank's RSS with next to no data.
3. --today (0: skipped): the rank program under plain torchrun at that size, every rank reading and
   tokenizing everything itself (today's path without a prepared entry).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import tempfile
import time
from pathlib import Path

from prepared_data import PYTHON, measure, recipe, write_conversations

BASELINE_CONVERSATIONS = 1_000


def prepare(recipe_path: Path, work: Path, *overrides: str) -> tuple[float, str]:
    """Wall seconds of `deepfleet prepare` and its summary line."""
    started = time.time()
    done = subprocess.run([PYTHON, "-m", "deepfleet.cli.app", "prepare", str(recipe_path), *overrides], cwd=work,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"prepare exited {done.returncode}: {done.stderr[-2000:]}")
    return time.time() - started, done.stdout.strip().splitlines()[-1]


def same_entries(first: Path, second: Path) -> bool:
    entries = [next(path for path in root.iterdir() if not path.name.startswith(".")) for root in (first, second)]
    names = sorted(path.name for path in entries[0].iterdir())
    return names == sorted(path.name for path in entries[1].iterdir()) and \
        all(filecmp.cmp(entries[0] / name, entries[1] / name, shallow=False) for name in names)


def dataset(work: Path, n: int) -> Path:
    path = work / f"chat-{n}.jsonl"
    if path.exists():
        return path
    started = time.time()
    write_conversations(path, n)
    print(f"{n:,} conversations, {path.stat().st_size / 2**20:.0f} MiB, generated in {time.time() - started:.0f} s",
          flush=True)
    return path


def compare_workers(work: Path, n: int) -> None:
    data = dataset(work, n)
    path = recipe(work, data, f"compare-{n}")
    seconds = {}
    for workers in (1, 2):
        cache = work / f"cache-workers-{workers}"
        seconds[workers], summary = prepare(path, work, f"data.prepare_workers={workers}", f"data.cache_dir={cache}")
        print(f"prepare {n:,} conversations, {workers} worker(s): {seconds[workers]:.1f} s   {summary}", flush=True)
    identical = same_entries(work / "cache-workers-1", work / "cache-workers-2")
    print(f"speed-up {seconds[1] / seconds[2]:.2f}x; entries identical byte for byte: {identical}", flush=True)


def train_warm(work: Path, data: Path, name: str, nproc: int) -> dict:
    return measure([PYTHON, "-m", "deepfleet.cli.app", "train", str(recipe(work, data, name)), f"--nproc={nproc}"],
                   work, work / name)


def scaling(work: Path, n: int) -> None:
    for size in (BASELINE_CONVERSATIONS, n):
        data = dataset(work, size)
        seconds, summary = prepare(recipe(work, data, f"prepare-{size}"), work)
        print(f"prepare {size:,} conversations (one worker per core): {seconds:.1f} s   {summary}", flush=True)
        for nproc in (1, 2):
            run = train_warm(work, data, f"warm-{size}-{nproc}", nproc)
            print(f"train {size:,} conversations, warm cache, {nproc} rank(s): first step {run['first_step']:.1f} s   "
                  f"{memory(run, nproc)}", flush=True)


def today(work: Path, n: int) -> None:
    data = dataset(work, n)
    run = measure([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "deepfleet.train",
                   "--recipe", str(recipe(work, data, f"today-{n}"))], work, work / f"today-{n}")
    print(f"today {n:,} conversations (every rank tokenizes), 2 ranks: first step {run['first_step']:.1f} s   "
          f"{memory(run, 2)}", flush=True)


def memory(run: dict, ranks: int) -> str:
    def mib(values: list[float]) -> str:
        return ", ".join(f"{value:.0f}" for value in values[:ranks])
    return f"peak RSS per rank (MiB) {mib(run['rss'])}, of it private (RssAnon) {mib(run['private'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--compare", type=int, default=100_000)
    parser.add_argument("--today", type=int, default=50_000)
    args = parser.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}", flush=True)
    with tempfile.TemporaryDirectory(prefix="deepfleet-scaling-") as directory:
        work = Path(directory)
        if args.compare:
            compare_workers(work, args.compare)
        scaling(work, args.conversations)
        if args.today:
            today(work, args.today)


if __name__ == "__main__":
    main()
