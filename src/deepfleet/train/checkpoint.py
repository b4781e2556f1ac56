"""Checkpoints that are complete or ignored: output_dir/checkpoints/step-N/ counts only with its marker.

Save: every rank writes its DeepSpeed shards (tag "engine") and its RNG states; after a barrier the
first rank of every host fsyncs what its host holds, a second barrier, then each host's first rank
writes the COMPLETE marker by atomic rename. DeepSpeed's own `latest` pointer is never written, so
nothing points at a half-written dir. Each host marks its own copy, so output dirs that are not
shared between hosts work the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from deepfleet.errors import DeepfleetError
from deepfleet.train.checkpoint_layout import (COMPLETE_MARKER, DS_CONFIG_FILE, ENGINE_TAG, RECIPE_FILE,
                                               check_engine_dir, checkpoints_root, complete_checkpoints, step_dir)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    for directory in [path, *[d for d in path.rglob("*") if d.is_dir()]]:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_marker(path: Path, content: dict[str, Any]) -> None:
    tmp = path / f".{COMPLETE_MARKER}.tmp-{os.getpid()}"
    with tmp.open("w") as handle:
        handle.write(json.dumps(content, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, train_state: Any, output_dir: Path, *, rank: int, local_rank: int,
                    fingerprint: dict[str, Any], keep: int, recipe_json: str, ds_config: dict) -> Path:
    """Collective: every rank calls it at the same step. Returns the checkpoint dir."""
    path = step_dir(output_dir, train_state.step)
    engine.save_checkpoint(str(path), tag=ENGINE_TAG, client_state={"train_state": asdict(train_state)},
                           save_latest=False)
    torch.save(rng_state(), path / f"rng-rank-{rank}.pt")
    if local_rank == 0:  # what `deepfleet export` needs to rebuild the model
        (path / RECIPE_FILE).write_text(recipe_json)
        (path / DS_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")
    _barrier()
    if local_rank == 0:
        _fsync_tree(path)
    _barrier()
    if local_rank == 0:
        _write_marker(path, {"step": train_state.step, "saved_at": time.time(), "fingerprint": fingerprint})
    _barrier()
    # Only once every host has marked this step: a host stopped before its marker must still find
    # the previous step everywhere.
    if local_rank == 0:
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def common_resume_step(steps_by_rank: Sequence[tuple[str, Sequence[int]]], output_dir: Path) -> int:
    """The newest step complete for every rank ((host, steps) each), or -1 when no rank has one.

    Some ranks with checkpoints and none shared by all is an error: starting everyone over would
    silently drop the progress, and would rewrite old step dirs that still carry a COMPLETE marker.
    """
    sets = [set(steps) for _, steps in steps_by_rank]
    common = set.intersection(*sets) if sets else set()
    if common:
        return max(common)
    if not any(sets):
        return -1
    held = sorted({f"{host}: {max(steps) if steps else 'none'}" for host, steps in steps_by_rank})
    raise DeepfleetError(f"no checkpoint is complete on every host (newest per host: {'; '.join(held)})",
                         where=str(checkpoints_root(output_dir)),
                         fix="restore the missing host's checkpoints, or set resume: false to start over "
                             "(the old checkpoints are moved aside)")


def load_checkpoint(engine, path: Path, *, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved train state fields."""
    check_engine_dir(path)
    load_path, client_state = engine.load_checkpoint(str(path), tag=ENGINE_TAG)
    if load_path is None:
        raise DeepfleetError(f"DeepSpeed could not load checkpoint {path}", where=str(path),
                             fix="remove this checkpoint dir to resume from the previous one, or use --no-resume")
    rng_file = path / f"rng-rank-{rank}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return client_state["train_state"]


def output_dir_shared_by_all_ranks(output_dir: Path, *, rank: int, local_rank: int, device: torch.device) -> bool:
    """Whether every rank sees the same output dir: rank 0 writes a token, the others look for it.

    When hosts keep their own disks, DeepSpeed must write its non-ZeRO model states on every host
    (`use_node_local_storage`), or no host but the first could resume; on shared storage that
    setting would make hosts write the same file at once, so it is set only when needed.
    """
    token = output_dir / f".shared-check-{os.environ.get('MASTER_PORT', '0')}"
    if local_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    if rank == 0:
        token.write_text("")
    _barrier()
    seen = torch.tensor([1.0 if token.exists() else 0.0], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    _barrier()
    if rank == 0:
        token.unlink(missing_ok=True)
    return bool(seen.item())
