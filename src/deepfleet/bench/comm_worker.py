"""Per-rank collective timing: `python -m deepfleet.bench.comm_worker --sizes 1024,1048576 ...` under torchrun.

gloo on CPU, NCCL on GPU. Every decision that changes what runs (which sizes fit in memory, how many
iterations fit the time budget, when to stop) is agreed through a collective, so ranks never diverge.
Rank 0 prints one line `RESULT_MARKER {json}` on stdout, which the head picks out of the streamed log.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from deepfleet.bench.comm import (OPERATIONS, CommReport, Measurement, Skipped, iterations_for, measurement,
                                  peak_bytes_per_rank, report_line)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=120)


def available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return available_memory_bytes()


def agreed(value: float, device: torch.device, op=dist.ReduceOp.MAX) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def run_collective(operation: str, buffers: dict[str, torch.Tensor]) -> None:
    if operation == "all_reduce":
        dist.all_reduce(buffers["full"])
    elif operation == "all_gather":
        dist.all_gather_into_tensor(buffers["full"], buffers["shard"])
    else:
        dist.reduce_scatter_tensor(buffers["shard"], buffers["full"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_collective(operation: str, buffers: dict[str, torch.Tensor], iterations: int,
                    device: torch.device) -> tuple[float, float]:
    """(mean, fastest) seconds per iteration, each on the slowest rank."""
    dist.barrier()
    synchronize(device)
    started = best = time.perf_counter()
    best_seconds = float("inf")
    for _ in range(iterations):
        run_collective(operation, buffers)
        synchronize(device)
        now = time.perf_counter()
        best_seconds, best = min(best_seconds, now - best), now
    return agreed((time.perf_counter() - started) / iterations, device), agreed(best_seconds, device)


def measure_all(args: argparse.Namespace, device: torch.device) -> CommReport:
    n_ranks = dist.get_world_size()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    element = torch.tensor([], dtype=torch.float32).element_size()
    # The smallest free memory of any host, split among its ranks, bounds every buffer.
    memory = agreed(device_memory_bytes(device) / local_ranks, device, op=dist.ReduceOp.MIN)
    deadline = time.monotonic() + args.deadline
    measurements: list[Measurement] = []
    skipped: list[Skipped] = []
    for operation in args.operations:
        too_slow = False
        for size in args.sizes:
            count = max(n_ranks, size // element // n_ranks * n_ranks)   # divisible into equal shards
            size_bytes = count * element
            if too_slow or agreed(float(time.monotonic() > deadline), device):
                skipped.append(Skipped(operation=operation, size_bytes=size_bytes,
                                       reason="time budget" if too_slow else "total deadline"))
                continue
            if peak_bytes_per_rank(size_bytes, n_ranks) > memory * args.memory_fraction:
                skipped.append(Skipped(operation=operation, size_bytes=size_bytes, reason="memory"))
                continue
            buffers = {"full": torch.ones(count, dtype=torch.float32, device=device),
                       "shard": torch.ones(count // n_ranks, dtype=torch.float32, device=device)}
            warmup, _ = time_collective(operation, buffers, 1, device)
            iterations = iterations_for(warmup, budget_seconds=args.budget, max_iterations=args.max_iterations)
            seconds, best_seconds = time_collective(operation, buffers, iterations, device)
            measurements.append(measurement(operation, size_bytes, iterations=iterations, seconds=seconds,
                                            n_ranks=n_ranks, best_seconds=best_seconds))
            del buffers
            # One more iteration of the next (larger) size would not fit the budget: stop this collective.
            too_slow = warmup > args.budget
    n_hosts = n_ranks // max(local_ranks, 1)
    return CommReport(backend=dist.get_backend(), n_ranks=n_ranks, n_hosts=n_hosts, dtype="float32",
                      measurements=measurements, skipped=skipped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deepfleet.bench.comm_worker")
    parser.add_argument("--sizes", required=True, help="comma-separated byte counts")
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed iterations per size")
    parser.add_argument("--max-iterations", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--memory-fraction", type=float, default=0.5, help="of free memory per rank")
    args = parser.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.operations = [op for op in args.operations.split(",") if op]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)   # torch's renames of *_into_tensor
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        report = measure_all(args, device)
        if dist.get_rank() == 0:
            print(report_line(report), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from deepfleet.train.distributed import exit_rank

    exit_rank(main())
