"""`deepfleet export` of a run whose output_dir is not shared: each host kept its own ranks' shards.

The step is exported from where the head runs when its copy holds every rank; otherwise the step's
files are collected from the fleet's hosts over ssh (`fleet/collect.py`, sha256-verified) into a
staging dir beside the target, exported from there, and the staging dir removed. A collection cut
off midway resumes from what the staging dir already holds.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.collect import collect, described, held_here, holdings, sources_for
from deepfleet.fleet.inventory import Fleet
from deepfleet.train.checkpoint_layout import CHECKPOINTS_DIR, COMPLETE_MARKER, read_marker

RANK_FILE = re.compile(r"^rng-rank-(\d+)\.pt$")                 # one per rank, saved with its shards
STEP_MARKER = re.compile(rf"^step-(\d+)/{COMPLETE_MARKER}$")


def ranks_missing(step_dir: Path) -> list[int]:
    """Ranks of the run's world whose files this step dir lacks (the marker records the world size)."""
    world = read_marker(step_dir).get("fingerprint", {}).get("world_size", 1)
    present = {int(m.group(1)) for name in os.listdir(step_dir) if (m := RANK_FILE.match(name))}
    return [rank for rank in range(world) if rank not in present]


def pick_step(steps: list[int], step: int | None, where: str) -> int:
    if not steps:
        raise DeepfleetError("no complete checkpoint on any host of the fleet", where=where,
                             fix="pass the output_dir of a run that saved checkpoints (checkpoint.every_steps)")
    if step is not None and step not in steps:
        raise DeepfleetError(f"no complete checkpoint for step {step} on any host", where=where,
                             fix=f"use one of --step {', '.join(map(str, steps))}")
    return max(steps) if step is None else step


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def collect_checkpoint(run_dir: Path, fleet: Fleet, *, step: int | None, staging: Path) -> tuple[int, list[str]]:
    """The step's files from the head and every host into `staging/checkpoints/step-N`; the step and
    what was collected from where."""
    checkpoints = str(run_dir / CHECKPOINTS_DIR)
    held = holdings(fleet, checkpoints)
    steps = sorted({int(m.group(1)) for holding in held.values() for rel in holding if (m := STEP_MARKER.match(rel))})
    chosen = pick_step(steps, step, checkpoints)
    prefix = f"step-{chosen}/"
    into = staging / CHECKPOINTS_DIR
    for rel in held["head"]:
        if rel.startswith(prefix):
            _place(run_dir / CHECKPOINTS_DIR / rel, into / rel)
    held["head"] = held_here(str(into))   # with what an earlier, cut-off collection already brought
    wanted = sorted({rel for holding in held.values() for rel in holding if rel.startswith(prefix)})
    pulled = collect(fleet, checkpoints, str(into), held, sources_for(wanted, held))
    missing = ranks_missing(into / f"step-{chosen}")
    if missing:
        raise DeepfleetError(f"rank(s) {', '.join(map(str, missing))} of step {chosen} are on no host of the fleet",
                             where=checkpoints, fix="add the hosts that trained those ranks to the fleet")
    return chosen, described(pulled)


def export_run(run_dir: Path, *, to: Path, step: int | None, merge: bool, fleet: Fleet | None) -> tuple[Path, list[str]]:
    """Export from here when this copy is whole; else collect the step from `fleet` first."""
    from deepfleet.train.export import export_checkpoint, pick_checkpoint, resolved_export_target

    run_dir = run_dir.expanduser().resolve()
    target = resolved_export_target(to, run_dir)
    local_missing = None
    try:
        local_missing = ranks_missing(pick_checkpoint(run_dir, step))
    except DeepfleetError:
        if fleet is None:
            raise
    if fleet is None and local_missing:
        raise DeepfleetError(f"this copy of the checkpoint lacks rank(s) {', '.join(map(str, local_missing))}: "
                             f"their shards are on other hosts", where=str(run_dir),
                             fix="pass --fleet (or --hostfile) to collect them over ssh")
    if fleet is None or local_missing == []:
        return export_checkpoint(run_dir, to=target, step=step, merge=merge), []
    staging = target.parent / f".{target.name}.collecting"
    chosen, lines = collect_checkpoint(run_dir, fleet, step=step, staging=staging)
    exported = export_checkpoint(staging, to=target, step=chosen, merge=merge)
    shutil.rmtree(staging, ignore_errors=True)
    return exported, lines
