"""Helpers shared by the training integration tests: small data files, recipes, running the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from deepfleet.train.builtin import builtin_task_records

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEEPFLEET = str(Path(sys.executable).with_name("deepfleet"))


def write_task_data(directory: Path, *, n_train: int = 600, n_validation: int = 48) -> tuple[Path, Path]:
    """Built-in task records as JSONL files: a few hundred load in a second, unlike the full 20k."""
    directory.mkdir(parents=True, exist_ok=True)
    train, validation = directory / "train.jsonl", directory / "validation.jsonl"
    for path, records in ((train, builtin_task_records(n_train, seed=7, split="train")),
                          (validation, builtin_task_records(n_validation, seed=7, split="heldout"))):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return train, validation


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([DEEPFLEET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
