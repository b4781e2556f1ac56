"""Prepared data: the training and validation examples tokenized once, on the head (data_cache.py),
and memory-mapped by every rank, which reads only the examples of its own rows.

An entry's layout: `{train,validation}.{ids,labels}.npy` (int32, every example's tokens end to end),
`{split}.offsets.npy` (int64, n + 1 boundaries), `report.json` (the DatasetReport, the key
inputs, every array's size), `COMPLETE`. An entry is written into a temporary dir beside it,
fsynced and renamed in, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from deepfleet.plan.recipe import Recipe
from deepfleet.train.examples import DatasetReport, TokenizedExample

COMPLETE = "COMPLETE"
REPORT = "report.json"
SPLITS = ("train", "validation")
ARRAYS = ("ids", "labels", "offsets")
log = logging.getLogger(__name__)


class MappedExamples(Sequence[TokenizedExample]):
    """Examples read from memory-mapped arrays: an example's tokens are read when it is indexed."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.ids, self.labels, self.offsets = ids, labels, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return TokenizedExample(input_ids=self.ids[start:end].tolist(), labels=self.labels[start:end].tolist())

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()


def _arrays(examples: Sequence[TokenizedExample]) -> dict[str, np.ndarray]:
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(example) for example in examples], out=offsets[1:])
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(offsets[-1]))
    return {"ids": ids, "labels": labels, "offsets": offsets}


def write_entry(directory: Path, splits: dict[str, Sequence[TokenizedExample]], report: DatasetReport,
                inputs: dict) -> None:
    sizes = {}
    for split, examples in splits.items():
        for name, array in _arrays(examples).items():
            path = directory / f"{split}.{name}.npy"
            with open(path, "wb") as handle:
                np.save(handle, array)
                handle.flush()
                os.fsync(handle.fileno())
            sizes[path.name] = path.stat().st_size
    (directory / REPORT).write_text(json.dumps({"report": asdict(report), "inputs": inputs, "sizes": sizes}))
    (directory / COMPLETE).write_text("")
    for path in (directory / REPORT, directory / COMPLETE):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def entry_problem(path: Path) -> str | None:
    """Why the entry at `path` cannot be used (None: it is whole), without reading the token arrays."""
    if not (path / COMPLETE).is_file():
        return "not complete"
    try:
        meta = json.loads((path / REPORT).read_text())
        for name, size in meta["sizes"].items():
            if (path / name).stat().st_size != size:
                return f"{name} has {(path / name).stat().st_size} bytes, not {size}"
        for split in SPLITS:
            offsets = np.load(path / f"{split}.offsets.npy", mmap_mode="r")
            tokens = np.load(path / f"{split}.ids.npy", mmap_mode="r")
            count = meta["report"]["n_train" if split == "train" else "n_validation"]
            if len(offsets) != count + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
                return f"{split} boundaries do not match its {count} examples"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable: {exc}"
    return None


def load_entry(path: Path) -> tuple[MappedExamples, MappedExamples, DatasetReport]:
    """(train, validation, report) of a whole entry, memory-mapped."""
    meta = json.loads((path / REPORT).read_text())
    splits = [MappedExamples(*(np.load(path / f"{split}.{name}.npy", mmap_mode="r") for name in ARRAYS))
              for split in SPLITS]
    return splits[0], splits[1], DatasetReport(**meta["report"])


def rank_datasets(recipe: Recipe, tokenizer, entry: str | None):
    """A rank's (train, validation, report): the head's prepared entry when this host has it whole,
    else tokenized here (a host without the cache, or a hand-run torchrun)."""
    if entry:
        problem = entry_problem(Path(entry))
        if problem is None:
            return load_entry(Path(entry))
        log.warning("prepared data %s is %s on this host; tokenizing here", entry,
                    "missing" if problem == "not complete" and not Path(entry).exists() else problem)
    from deepfleet.train.dataset import build_datasets

    return build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
