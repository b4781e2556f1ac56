"""What a rank learns from the environment its launcher set, and the few collectives the loop needs."""

from __future__ import annotations

import atexit
import os
import random
import sys
from dataclasses import dataclass
from typing import Mapping, NoReturn

import torch
import torch.distributed as dist

from deepfleet.contract import HEARTBEAT_DIR_ENV


@dataclass(frozen=True, kw_only=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    heartbeat_dir: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "RankEnv":
        return cls(rank=int(environ.get("RANK", 0)), local_rank=int(environ.get("LOCAL_RANK", 0)),
                   world_size=int(environ.get("WORLD_SIZE", 1)), heartbeat_dir=environ.get(HEARTBEAT_DIR_ENV) or None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, kw_only=True)
class Device:
    accelerator: str            # "cpu" or "cuda" (DeepSpeed's name)
    device: torch.device
    bf16_supported: bool


def init_distributed(rank_env: RankEnv) -> Device:
    """gloo on CPU, nccl on GPU: whatever DeepSpeed's accelerator says."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    name = accelerator.device_name()
    if name != "cpu":
        accelerator.set_device(rank_env.local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = torch.device(accelerator.device_name(rank_env.local_rank)) if name != "cpu" else torch.device("cpu")
    return Device(accelerator=name, device=device,
                  bf16_supported=name != "cpu" and bool(accelerator.is_bf16_supported()))


def close_distributed() -> None:
    """Destroy the process group after a clean end (every rank done, or every rank preempted at the same
    step), as torch documents. Not after a failure: with a peer stuck in a collective, destroying can hang
    (torchtitan#1342); the supervisor tears those ranks down."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank process as multiprocessing ends its children: exit handlers run and streams are flushed,
    then `os._exit` skips the interpreter's teardown. During that teardown a gloo worker thread still
    releasing a finished collective (an all-gather's tensors, held by the barrier after it) needs the GIL,
    cannot take it, and aborts the process (SIGABRT, "terminate called without an active exception",
    pytorch#190489): a finished rank would be reported failed with 134."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def loadable_prebuilt_ops(installed_ops: Mapping[str, bool], *, built_for: str, built_with: Mapping[str, str],
                          accelerator: str, runtime: Mapping[str, str]) -> frozenset[str]:
    """Ops DeepSpeed's install compiled that it will load here instead of building them (OpBuilder.load):
    built for this accelerator, and with the major.minor of each `runtime` version (torch_info's keys:
    torch "version", and on a GPU "cuda_version" or "hip_version"); otherwise it builds them or refuses."""
    def major_minor(version: str) -> str:
        return ".".join(version.split(".")[:2])
    if built_for != accelerator or any(built_with.get(key) != major_minor(v) for key, v in runtime.items()):
        return frozenset()
    return frozenset(op for op, built in installed_ops.items() if built)


def ops_prebuilt_on_every_rank() -> frozenset[str]:
    """Prebuilt DeepSpeed ops that every rank has: all ranks must pick the same optimizer (one update
    rule, one checkpoint format). Reads DeepSpeed's install record; builds nothing."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops, torch_info

    runtime = {"version": torch.__version__}
    if torch.cuda.is_available():
        gpu = ("hip_version", torch.version.hip) if torch.version.hip else ("cuda_version", torch.version.cuda)
        runtime[gpu[0]] = gpu[1]
    mine = loadable_prebuilt_ops(installed_ops, built_for=accelerator_name, built_with=torch_info,
                                 accelerator=get_accelerator()._name, runtime=runtime)
    return frozenset.intersection(*objects_across_ranks(mine))


def seed_rank(seed: int, rank: int) -> None:
    """Distinct, reproducible randomness per rank (dropout); data order never depends on it."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_across_ranks(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values`, in rank order (one collective for all the per-step numbers)."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [mine.tolist()]
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def objects_across_ranks(value: object) -> list[object]:
    """Every rank's picklable `value`, in rank order."""
    if not dist.is_initialized():
        return [value]
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
