"""Where checkpoints live and which count, without torch: output_dir/checkpoints/step-N/ counts only
with its COMPLETE marker. The head reads this before launch (resume checks, export); the ranks' saving
and loading are in checkpoint.py.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import Recipe

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
ENGINE_TAG = "engine"
RECIPE_FILE = "recipe.json"
DS_CONFIG_FILE = "ds_config.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS_DIR


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step-{step}"


def run_fingerprint(recipe: Recipe, *, world_size: int) -> dict[str, Any]:
    """What must not change across a resume: the run would silently become another run."""
    return {"model": recipe.model.name, "method": recipe.method, "world_size": world_size,
            "global_batch": recipe.train.global_batch,
            "data": {"train": recipe.data.train, "format": recipe.data.format, "max_length": recipe.data.max_length,
                     "packing": recipe.data.packing, "seed": recipe.train.seed}}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key}: checkpoint has {saved.get(key)!r}, this run has {current[key]!r}"
            for key in current if saved.get(key) != current[key]]


@dataclass(frozen=True, kw_only=True)
class SavePolicy:
    every_steps: int
    every_minutes: float
    keep: int

    def due(self, *, step: int, seconds_since_save: float) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_minutes > 0 and seconds_since_save >= self.every_minutes * 60
        return by_steps or by_time


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint with a completion marker, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete step dirs without a marker (a save that died). Call before any new save starts."""
    root = checkpoints_root(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and (STEP_DIR.match(path.name) or path.name.endswith(".tmp")) \
                    and not (path / COMPLETE_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((path / COMPLETE_MARKER).read_text())


def check_engine_dir(path: Path) -> None:
    """DeepSpeed asserts (no useful message) when a marked checkpoint lost its shards dir."""
    if not (path / ENGINE_TAG).is_dir():
        raise DeepfleetError(f"checkpoint is damaged: it has no {ENGINE_TAG}/ dir", where=str(path),
                             fix="delete this step dir so the previous complete one is used, or use --no-resume")


def check_resumable(path: Path, fingerprint: dict[str, Any]) -> None:
    differences = fingerprint_differences(read_marker(path).get("fingerprint", {}), fingerprint)
    if differences:
        raise DeepfleetError(f"resuming {path} would change the run: {'; '.join(differences)}",
                             where="resume",
                             fix="use a new output_dir, or --no-resume (resume: false) to start over")
