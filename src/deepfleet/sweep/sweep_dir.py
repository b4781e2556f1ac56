"""The sweep dir: what it holds, its manifest (the sweep it belongs to), each trial's status, and what
a resumed sweep does with each trial.

    sweep.json               recipe, base overrides, grid, --random/--seed, and the trials (id, overrides)
    trials/<id>/             each trial's output_dir (final/, checkpoints/, metrics.jsonl, logs/ ...)
    status/<id>.json         how the trial's last run ended: done, failed (exit code, error) or interrupted
    .lock                    held (flock) by the running sweep and each trial it started
    logs/<id>.log            the trial's `deepfleet train` output, as the sweep printed it
    results.{md,csv,json,png}  the trials ranked by validation loss, with tokens/s
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import Recipe
from deepfleet.sweep.grid import GridAxis, Trial
from deepfleet.train.checkpoint_layout import complete_checkpoints

MANIFEST_FILE = "sweep.json"
LOCK_FILE = ".lock"
MANIFEST_FORMAT = 1
DONE, FAILED, INTERRUPTED = "done", "failed", "interrupted"


@dataclass(frozen=True)
class SweepLayout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def status_file(self, trial_id: str) -> Path:
        return self.root / "status" / f"{trial_id}.json"

    def head_log(self, trial_id: str) -> Path:
        return self.root / "logs" / f"{trial_id}.log"

    def results(self, suffix: str) -> Path:
        return self.root / f"results.{suffix}"


@dataclass(frozen=True, kw_only=True)
class TrialStatus:
    status: str                      # DONE, FAILED or INTERRUPTED
    exit_code: int
    seconds: float = 0.0
    started: float = 0.0             # unix time the trial's last run started
    error: str = ""                  # the trial's own `error:` line, when it printed one


def write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_status(layout: SweepLayout, trial_id: str, status: TrialStatus) -> None:
    write_json_atomically(layout.status_file(trial_id), asdict(status))


def read_status(layout: SweepLayout, trial_id: str) -> TrialStatus | None:
    """The trial's recorded ending; None when it never ended (not started, or the sweep was killed)."""
    path = layout.status_file(trial_id)
    try:
        data = json.loads(path.read_text())
        return TrialStatus(status=str(data["status"]), exit_code=int(data["exit_code"]),
                           seconds=float(data.get("seconds") or 0.0), started=float(data.get("started") or 0.0),
                           error=str(data.get("error") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def manifest_data(*, recipe_path: str | None, base_overrides: Sequence[str], axes: Sequence[GridAxis],
                  random_count: int | None, seed: int, base: Recipe, trials: Sequence[Trial]) -> dict[str, Any]:
    """What identifies the sweep. The recipe as resolved (its env: left out: it may hold secrets)."""
    return {"format": MANIFEST_FORMAT, "recipe_file": recipe_path, "overrides": list(base_overrides),
            "grid": [{"key": axis.key, "values": list(axis.values)} for axis in axes],
            "random": random_count, "seed": seed,
            "recipe": base.model_dump(mode="json", exclude={"env", "output_dir"}),
            "trials": [{"id": t.id, "overrides": list(t.overrides), "values": t.values} for t in trials]}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    return {key: value for name, item in data.items() for key, value in _flat(item, f"{prefix}{name}.").items()} \
        if data else {prefix: data}


def manifest_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How the sweep in the dir differs from this command's, or None when it is the same sweep."""
    saved_recipe, recipe = _flat(saved.get("recipe") or {}), _flat(current["recipe"])
    for key in sorted(set(saved_recipe) | set(recipe)):
        if saved_recipe.get(key) != recipe.get(key):
            return (f"its recipe has {key.rstrip('.')}={json.dumps(saved_recipe.get(key))}, this command's "
                    f"{json.dumps(recipe.get(key))}")
    saved_ids, ids = [t.get("id") for t in saved.get("trials") or []], [t["id"] for t in current["trials"]]
    if saved_ids != ids:
        old = {t.get("id"): " ".join(t.get("overrides") or []) for t in saved.get("trials") or []}
        extra = [t["overrides"] for t in current["trials"] if t["id"] not in old]
        missing = [label for trial_id, label in old.items() if trial_id not in ids]
        detail = (f"trial {' '.join(extra[0])} is not in it" if extra else f"its trial {missing[0]} is not in this grid"
                  if missing else "its trials are in another order")
        return f"another grid: {detail}"
    return None


def check_or_write_manifest(layout: SweepLayout, manifest: dict[str, Any]) -> bool:
    """True when the dir already holds this sweep (a resume); writes the manifest for a new sweep; another
    sweep in the dir is refused."""
    if not layout.manifest.exists():
        if layout.root.exists() and any(layout.root.iterdir()):
            raise DeepfleetError("the sweep dir is not empty and holds no sweep", where=str(layout.root),
                                 fix="choose another dir with --out")
        write_json_atomically(layout.manifest, manifest)
        return False
    try:
        saved = json.loads(layout.manifest.read_text())
    except (OSError, ValueError) as exc:
        raise DeepfleetError(f"cannot read the sweep manifest: {exc}", where=str(layout.manifest),
                             fix=f"remove {layout.root} to start the sweep fresh, or use --out") from None
    difference = manifest_difference(saved if isinstance(saved, dict) else {}, manifest)
    if difference:
        raise DeepfleetError(f"this dir holds another sweep ({difference})", where=str(layout.manifest),
                             fix=f"run the command that started it to resume it, pass --out NEWDIR, or remove "
                                 f"{layout.root} to start fresh")
    return True


def hold_sweep_lock(layout: SweepLayout) -> int:
    """An exclusive lock on the sweep dir for this sweep, as an open fd that every trial's `deepfleet train`
    inherits: the dir stays locked while any of them runs, even after the sweep itself was killed, so a
    second sweep never trains into a trial dir that a first one still trains in."""
    fd = os.open(layout.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DeepfleetError("another deepfleet sweep, or a trial it started, is still running in this dir",
                             where=str(layout.root), fix="wait for it to end (or stop it), then run this again") from None
    return fd


def trial_action(status: TrialStatus | None, *, final_exists: bool, retry_failed: bool) -> str:
    """What a (resumed) sweep does with a trial: "skip" a finished one (done with its final model, or failed
    unless `retry_failed`), else "run" it (training resumes from its newest complete checkpoint)."""
    if status is not None and status.status == DONE and final_exists:
        return "skip"
    if status is not None and status.status == FAILED and not retry_failed:
        return "skip"
    return "run"


def resume_step(layout: SweepLayout, trial_id: str) -> int | None:
    """The step an unfinished trial resumes from, or None when it starts from scratch."""
    found = complete_checkpoints(layout.trial_dir(trial_id))
    return found[-1][0] if found else None
