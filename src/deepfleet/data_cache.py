"""The prepared-data cache on the head: where entries live, what keys them, and building one
(`deepfleet prepare`, and `deepfleet train` before it launches). The entry format and the ranks'
side are in train/prepared_data.py.

An entry is named by a key over everything that decides its content: the content digest of every
data file (the manifest kept beside it, see fleet/remote_probe_manifest.py), the tokenizer (its
model dir's files but the weights, or for a Hub id the files `save_pretrained` writes), the format,
max_length, the validation split or files and the seed. Changing any of them gives a new entry;
the old one is used again when the same inputs come back. Packing is not part of it: rows are
planned per epoch from the examples' lengths, on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.remote_probe_manifest import content_digest, is_manifest_file, load_manifest, scan, write_manifest
from deepfleet.plan.recipe import BUILTIN_DATA, DataSpec, Recipe
from deepfleet.train.examples import DatasetReport
from deepfleet.train.data_sources import source_path
from deepfleet.train.prepared_data import ChunkPart, entry_problem, load_entry, write_entry
from deepfleet.train.row_plan import store_row_plans
from deepfleet.train.tokenizer import load_tokenizer, local_tokenizer_dir

CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")


def default_cache_root(environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """$XDG_CACHE_HOME/deepfleet/data, else ~/.cache/deepfleet/data (as HF datasets does)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepfleet" / "data"


def cache_root(data: DataSpec) -> Path:
    return Path(data.cache_dir).expanduser().resolve() if data.cache_dir else default_cache_root()


Manifests = dict[str, dict]   # data path -> its content manifest, stored beside it once prepare succeeds


def source_identity(source: str, key: str, manifests: Manifests) -> str:
    """What a data source's content is: the built-in generator's name, else the files' content digest."""
    if source == BUILTIN_DATA:
        return source
    path = str(source_path(source, key))
    manifests[path] = scan(path, load_manifest(path))
    return "sha256:" + content_digest(manifests[path])


def store_manifests(manifests: Manifests) -> None:
    """Kept beside the data only after a successful prepare: a refused one leaves nothing behind."""
    for path, manifest in manifests.items():
        if manifest != load_manifest(path):
            write_manifest(path, manifest)


def tokenizer_dir_identity(directory: Path) -> str:
    """sha256 over a model dir's files but the weights: tokenizer files, chat template, config."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if (path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not is_manifest_file(path.name)
                and not any(part.startswith(".") for part in relative.parts)):
            digest.update(f"{relative}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def loaded_tokenizer_identity(tokenizer) -> str:
    """sha256 over the files `save_pretrained` writes: whatever changes how text becomes ids."""
    with tempfile.TemporaryDirectory(prefix="deepfleet-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        return type(tokenizer).__name__ + ":" + tokenizer_dir_identity(Path(directory))


def key_inputs(recipe: Recipe, tokenizer_identity: str, manifests: Manifests) -> dict:
    data = recipe.data
    return {"version": CACHE_VERSION, "train": [source_identity(s, "data.train", manifests) for s in data.train],
            "validation_files": [source_identity(s, "data.validation.files", manifests)
                                 for s in data.validation.files],
            "validation_split": data.validation.split, "format": data.format, "max_length": data.max_length,
            "seed": recipe.train.seed, "tokenizer": tokenizer_identity}


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    path: Path
    report: DatasetReport
    built: bool            # False: an existing entry was used
    seconds: float

    def summary(self) -> str:
        r = self.report
        done = f"prepared in {self.seconds:.1f} s" if self.built else "already prepared"
        return (f"data: {r.n_train} train / {r.n_validation} validation examples, {r.n_tokens:,} train tokens, "
                f"{done}: {self.path}")


def needed_bytes(splits: dict[str, list[ChunkPart]]) -> int:
    """The entry's arrays: two int32 and one int64 per token, one int64 per example boundary."""
    return sum(8 * int(part.lengths[part.keep].sum()) + 8 * part.count for parts in splits.values() for part in parts) \
        + 8 * len(splits)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(root: Path) -> None:
    """Before any tokenizing: the cache dir (or what would hold it) takes writes."""
    ancestor = _existing_ancestor(root)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        reason = "is not a directory" if not ancestor.is_dir() else "is not writable"
        raise DeepfleetError(f"cannot write the prepared-data cache: {ancestor} {reason}", where=str(root),
                             fix="make it writable, or set data.cache_dir to a writable dir")


def check_room(root: Path, needed: int) -> None:
    free = shutil.disk_usage(_existing_ancestor(root)).free
    if free < needed:
        raise DeepfleetError(f"the prepared data needs {needed / 2**20:.0f} MiB and {root} has "
                             f"{free / 2**20:.0f} MiB free", where="data.cache_dir",
                             fix="free some space, or point data.cache_dir at a larger disk")


def prepare_recipe_data(recipe: Recipe, *, note: Callable[[str], None] = print,
                        workers: int | None = None) -> PreparedData:
    """The entry for `recipe`'s data: the existing one when whole, else built and written. A model
    dir on this machine is keyed by its files, so a warm cache is found without loading transformers.
    `workers`: processes that build it (default data.prepare_workers, else one per core of the head)."""
    started = time.monotonic()
    directory = local_tokenizer_dir(recipe.model)
    tokenizer = None if directory else load_tokenizer(recipe.model)
    identity = tokenizer_dir_identity(directory) if directory else loaded_tokenizer_identity(tokenizer)
    manifests: Manifests = {}
    inputs = key_inputs(recipe, identity, manifests)
    root = cache_root(recipe.data)
    path = root / cache_key(inputs)
    if path.exists():
        problem = entry_problem(path)
        if problem is None:
            store_manifests(manifests)
            train, _, report = load_entry(path)
            store_row_plans(path, train, recipe)
            return PreparedData(path=path, report=report, built=False, seconds=time.monotonic() - started)
        note(f"note: prepared data {path} is damaged ({problem}); building it again")
    check_writable(root)
    report = _build_entry(recipe, tokenizer or load_tokenizer(recipe.model), root=root, path=path, inputs=inputs,
                          identity=identity, workers=workers or recipe.data.prepare_workers or default_workers())
    store_manifests(manifests)
    store_row_plans(path, load_entry(path)[0], recipe)
    return PreparedData(path=path, report=report, built=True, seconds=time.monotonic() - started)


def default_workers() -> int:
    """One per core this process may run on."""
    return len(os.sched_getaffinity(0))


def _missing_dirs(path: Path) -> list[Path]:
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def _build_entry(recipe: Recipe, tokenizer, *, root: Path, path: Path, inputs: dict, identity: str,
                 workers: int) -> DatasetReport:
    """Built in a temporary dir beside the entry (its chunks too) and renamed into place; nothing is
    left behind when it fails, and another process finishing the same entry first is fine."""
    from deepfleet.data_build import build_chunked   # loads transformers: not for a warm cache

    created, staging = _missing_dirs(root), None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))   # 0700: the data may be private
        built = build_chunked(recipe.data, tokenizer, model=recipe.model, seed=recipe.train.seed,
                              scratch=staging / "chunks", workers=workers)
        if key_inputs(recipe, identity, {}) != inputs:
            raise DeepfleetError("a data file changed while it was being prepared",
                                 where=", ".join(recipe.data.train),
                                 fix="wait until the data is written completely, then run again")
        check_room(root, needed_bytes(built.splits))
        write_entry(staging, built.splits, built.report, inputs)
        shutil.rmtree(staging / "chunks")
        shutil.rmtree(path, ignore_errors=True)          # a damaged entry
        os.rename(staging, path)
        staging = None
        return built.report
    except OSError as exc:
        if entry_problem(path) is not None:              # not another process finishing first
            raise DeepfleetError(f"cannot write the prepared data: {exc.strerror or exc}", where=str(root),
                                 fix="check the disk, or set data.cache_dir to another dir") from None
        return load_entry(path)[2]
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in created:                        # a refused prepare leaves no cache dir behind
            try:
                directory.rmdir()
            except OSError:
                break
