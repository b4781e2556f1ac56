"""The content of a prepared-data entry, built on the head in parallel over its cores.

Every data source is cut into contiguous chunks: a JSONL file into runs of whole lines, which the
workers read themselves (the head reads no record of it but the first, for the format); any other
kind of source is read here and handed out a run of records at a time. Each worker converts,
tokenizes and labels its chunks into arrays in a scratch dir (train/chunk_tokenize.py), and the
chunks are taken back in order, so the entry is the same byte for byte whatever the number of
workers, and the same as train/dataset.py's build_datasets gives a rank that tokenizes for itself.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import BUILTIN_DATA, DataSpec, ModelSpec
from deepfleet.train.chunk_tokenize import ChunkResult, ChunkTask, run_chunk, start_worker
from deepfleet.train.data_formats import detect_format, shape_fix
from deepfleet.train.data_sources import (JSONL_FIX, SourceRecord, capped_problems, first_jsonl_record, jsonl_spans,
                                          read_source, source_path)
from deepfleet.train.dataset import (check_chat_template, check_one_validation, empty_dataset_error,
                                     held_out_indices, warn_truncated)
from deepfleet.train.examples import DatasetReport
from deepfleet.train.prepared_data import ChunkPart

MAX_CHUNK_BYTES = 16 * 2**20   # of a JSONL file: bounds what a worker holds at once
MIN_CHUNK_BYTES = 2**20        # smaller chunks cost more in hand-over than they gain in balance
CHUNKS_PER_WORKER = 4          # several each, so a worker with slow records does not hold up the end
CHUNK_RECORDS = 20_000         # records of a source read on the head, per chunk
# fork: 40k conversations took 7.5 s with two workers against 13.7 s (forkserver) and 16.3 s (spawn), which
# import transformers again in every worker; and neither re-runs the caller's script, which forkserver and
# spawn do (a script calling deepfleet.train without a __main__ guard would start over in every worker).
# The head has not run the tokenizer when it forks, and workers turn its thread pool off.
START_METHOD = "fork"


@dataclass(frozen=True, kw_only=True)
class SourcePlan:
    """One source's chunks, or why it fails before any chunk is read (as one process would find it)."""
    source: str
    fmt: str | None = None
    unreadable: DeepfleetError | None = None   # found reading it on the head: reported before its chunks'
    undetected: DeepfleetError | None = None   # its format: reported after its malformed lines
    pieces: list = field(default_factory=list)  # a Span each (JSONL), else a list of SourceRecords each
    path: str = ""


def _chunk_bytes(size: int, workers: int) -> int:
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, math.ceil(size / (workers * CHUNKS_PER_WORKER))))


def plan_source(source: str, *, data: DataSpec, key: str, seed: int, validation: bool, workers: int) -> SourcePlan:
    first: SourceRecord | None = None
    try:
        path = None if source == BUILTIN_DATA else source_path(source, key)
        if path is not None and path.is_file() and path.suffix == ".jsonl":
            first = first_jsonl_record(path, key)
            if first is None:   # nothing to read in parallel: the whole file says what is wrong
                read_source(source, key=key, seed=seed, validation=validation)
            pieces: list = jsonl_spans(path, _chunk_bytes(path.stat().st_size, workers))
        else:
            records = read_source(source, key=key, seed=seed, validation=validation)
            first = records[0]
            pieces = [records[start:start + CHUNK_RECORDS] for start in range(0, len(records), CHUNK_RECORDS)]
    except DeepfleetError as exc:
        return SourcePlan(source=source, unreadable=exc)
    plan = SourcePlan(source=source, pieces=pieces, path=str(path or source))
    try:
        return replace(plan, fmt=detect_format(first) if data.format == "auto" else data.format)
    except DeepfleetError as exc:
        return replace(plan, undetected=exc)


def source_error(plan: SourcePlan, results: list[ChunkResult]) -> DeepfleetError | None:
    """What one process reading `plan`'s source would have raised first, if anything."""
    if plan.unreadable:
        return plan.unreadable
    for result in results:
        if result.unreadable:
            return DeepfleetError(problems=result.unreadable)
    malformed = [problem for result in results for problem in result.malformed]
    if malformed:
        return DeepfleetError(problems=capped_problems(malformed, fix=JSONL_FIX))
    if plan.undetected:
        return plan.undetected
    misshapen = [problem for result in results for problem in result.misshapen]
    if misshapen:
        return DeepfleetError(problems=capped_problems(misshapen, fix=shape_fix(plan.fmt or "")))
    return None


class ChunkRunner:
    """Runs chunk tasks in order: in this process with one worker (or one chunk), else in a pool
    started on first use and kept for the validation files."""

    def __init__(self, *, model: ModelSpec, tokenizer, workers: int):
        self.model, self.tokenizer, self.workers = model, tokenizer, workers
        self.pool: ProcessPoolExecutor | None = None

    def run(self, tasks: list[ChunkTask]) -> list[ChunkResult]:
        if self.workers <= 1 or len(tasks) <= 1:
            return [run_chunk(task, self.tokenizer) for task in tasks]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), initializer=start_worker,
                                            initargs=(self.model,),
                                            mp_context=multiprocessing.get_context(START_METHOD))
        try:
            return list(self.pool.map(run_chunk, tasks))
        except BrokenProcessPool:
            raise DeepfleetError("a worker preparing the data died (out of memory?)", where="data.prepare_workers",
                                 fix="set data.prepare_workers lower, or free memory on the head") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


@dataclass(frozen=True, kw_only=True)
class SourcesResult:
    formats: list[str]
    chunks: list[ChunkResult]
    n_records: int
    n_truncated: int
    n_without_answer: int


def run_sources(sources: list[str], *, data: DataSpec, key: str, seed: int, validation: bool, tokenizer,
                runner: ChunkRunner, scratch: Path, first_index: int) -> SourcesResult:
    """Every chunk of `sources` read, converted and (when nothing is wrong before it) tokenized."""
    plans = [plan_source(source, data=data, key=key, seed=seed, validation=validation, workers=runner.workers)
             for source in sources]
    template_error = None
    if not any(plan.unreadable or plan.undetected for plan in plans):
        try:
            check_chat_template(tokenizer, [plan.fmt for plan in plans], sources)
        except DeepfleetError as exc:
            template_error = exc
    tokenize = not any(plan.unreadable or plan.undetected for plan in plans) and template_error is None
    tasks, owners = [], []
    for number, plan in enumerate(plans):
        for piece in plan.pieces:
            tasks.append(ChunkTask(index=first_index + len(tasks), path=plan.path, key=key, fmt=plan.fmt,
                                   tokenize=tokenize, max_length=data.max_length, scratch=scratch,
                                   **({"span": piece} if isinstance(piece, tuple) else {"records": piece})))
            owners.append(number)
    results = runner.run(tasks)
    for number, plan in enumerate(plans):
        error = source_error(plan, [result for result, owner in zip(results, owners) if owner == number])
        if error:
            raise error
    if template_error:
        raise template_error
    for result in results:
        if result.rejected:
            raise DeepfleetError(problems=result.rejected)
    return SourcesResult(formats=[plan.fmt or "" for plan in plans], chunks=results,
                         n_records=sum(r.n_records for r in results), n_truncated=sum(r.n_truncated for r in results),
                         n_without_answer=sum(r.n_without_answer for r in results))


@dataclass(frozen=True, kw_only=True)
class BuiltData:
    splits: dict[str, list[ChunkPart]]    # train, validation: the chunks' examples each takes, in order
    report: DatasetReport


def _split_parts(chunks: list[ChunkResult], held: np.ndarray | None) -> Iterator[tuple[ChunkPart, ChunkPart]]:
    start = 0
    for chunk in chunks:
        count = len(chunk.lengths)
        in_validation = held[start:start + count] if held is not None else np.zeros(count, dtype=bool)
        start += count
        train, validation = (ChunkPart(ids=chunk.tokens("ids"), labels=chunk.tokens("labels"), lengths=chunk.lengths,
                                       keep=keep) for keep in (~in_validation, in_validation))
        yield train, validation


def build_chunked(data: DataSpec, tokenizer, *, model: ModelSpec, seed: int, scratch: Path,
                  workers: int) -> BuiltData:
    """What build_datasets gives, as chunk files in `scratch` and the parts of them each split takes."""
    check_one_validation(data)
    scratch.mkdir(parents=True, exist_ok=True)
    runner = ChunkRunner(model=model, tokenizer=tokenizer, workers=workers)
    try:
        common = {"data": data, "seed": seed, "tokenizer": tokenizer, "runner": runner, "scratch": scratch}
        train = run_sources(data.train, key="data.train", validation=False, first_index=0, **common)
        lengths = np.concatenate([chunk.lengths for chunk in train.chunks])
        if not len(lengths):
            raise empty_dataset_error(data, train.n_without_answer)
        held = None
        if data.validation.split > 0:
            held = np.zeros(len(lengths), dtype=bool)
            held[sorted(held_out_indices(len(lengths), data.validation.split, seed))] = True
        pairs = list(_split_parts(train.chunks, held))
        train_parts = [pair[0] for pair in pairs]
        validation_parts = [pair[1] for pair in pairs]
        results = [train]
        if data.validation.files:
            heldout = run_sources(data.validation.files, key="data.validation.files", validation=True,
                                  first_index=len(train.chunks), **common)
            validation_parts = [next(_split_parts([chunk], None))[0] for chunk in heldout.chunks]
            results.append(heldout)
    finally:
        runner.close()
    n_truncated = sum(result.n_truncated for result in results)
    warn_truncated(n_truncated, sum(result.n_records for result in results), data.max_length)
    n_labels = np.concatenate([chunk.n_labels for chunk in train.chunks])
    in_train = ~held if held is not None else np.ones(len(lengths), dtype=bool)
    report = DatasetReport(
        n_train=int(in_train.sum()), n_validation=sum(part.count for part in validation_parts),
        n_truncated=n_truncated, n_tokens=int(lengths[in_train].sum()),
        format="+".join(dict.fromkeys(fmt for result in results for fmt in result.formats)),
        n_label_tokens=int(n_labels[in_train].sum()),
        n_without_answer=sum(result.n_without_answer for result in results), max_length=data.max_length)
    return BuiltData(splits={"train": train_parts, "validation": validation_parts}, report=report)
