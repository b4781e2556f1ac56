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
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from deepfleet.plan.recipe import Recipe
from deepfleet.train.examples import DatasetReport, TokenizedExample
from deepfleet.train.row_plan import RowPlan, read_plan, stored_plan_name

COMPLETE = "COMPLETE"
REPORT = "report.json"
SPLITS = ("train", "validation")
ARRAYS = ("ids", "labels", "offsets")
log = logging.getLogger(__name__)


class MappedExamples(Sequence[TokenizedExample]):
    """Examples read from memory-mapped arrays: an example's tokens are read when it is indexed."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, plans: Path | None = None):
        self.ids, self.labels, self.offsets = ids, labels, offsets
        self.plans = plans   # the entry dir, which may hold row plans the head made (train split only)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return TokenizedExample(input_ids=self.ids[start:end].tolist(), labels=self.labels[start:end].tolist())

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> array:
        return array("q", np.diff(self.offsets).astype(np.int64).tobytes())

    def stored_rows(self, *, max_length: int, packing: bool, seed: int, epoch: int) -> RowPlan | None:
        name = stored_plan_name(packing=packing, max_length=max_length, seed=seed, epoch=epoch)
        return read_plan(self.plans, name, len(self)) if self.plans else None


@dataclass(frozen=True, kw_only=True)
class ChunkPart:
    """The examples a split takes from one chunk of tokenized data (data_build.py)."""
    ids: Path               # the chunk's tokens (int32 .npy), its examples end to end
    labels: Path
    lengths: np.ndarray     # every example's length
    keep: np.ndarray        # which of them the split takes

    @property
    def count(self) -> int:
        return int(self.keep.sum())

    def kept(self, name: str) -> np.ndarray:
        tokens = np.load(self.ids if name == "ids" else self.labels)
        return tokens if self.keep.all() else tokens[np.repeat(self.keep, self.lengths)]


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_tokens(handle, parts: list[ChunkPart], name: str, total: int) -> None:
    """One .npy of every part's tokens, as np.save would write their concatenation, one chunk in memory at a time."""
    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                                                  "fortran_order": False, "shape": (total,)})
    for part in parts:
        handle.write(part.kept(name).astype(np.int32, copy=False).tobytes())


def write_entry(directory: Path, splits: dict[str, list[ChunkPart]], report: DatasetReport, inputs: dict) -> None:
    sizes = {}
    for split, parts in splits.items():
        lengths = np.concatenate([part.lengths[part.keep] for part in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        for name in ARRAYS:
            path = directory / f"{split}.{name}.npy"
            if name == "offsets":
                _write_synced(path, lambda handle: np.save(handle, offsets))
            else:
                _write_synced(path, lambda handle: _write_tokens(handle, parts, name, int(offsets[-1])))
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
    splits = [MappedExamples(*(np.load(path / f"{split}.{name}.npy", mmap_mode="r") for name in ARRAYS),
                             plans=path if split == "train" else None)
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
