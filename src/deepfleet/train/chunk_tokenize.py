"""One contiguous chunk of a data source, read, converted, tokenized and labelled by a prepare
worker; data_build.py runs the chunks over the head's cores and takes them back in order.

A chunk's problems are returned, not raised, so the head can report them as one process reading
the sources in turn would have: a file that cannot be decoded first, then every malformed line of
the source, then every record of the wrong shape, and only after all sources the chat template and
the first conversation it rejects. The token arrays go to files in a scratch dir, so neither the
worker nor the head holds more than one chunk's tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.chat_labels import IGNORE_INDEX
from deepfleet.train.data_formats import converted_records
from deepfleet.train.data_sources import SourceRecord, Span, jsonl_records
from deepfleet.train.dataset import Sample, tokenize_samples
from deepfleet.train.examples import TokenizedExample

_worker_tokenizer = None     # set once per worker process by start_worker


@dataclass(frozen=True, kw_only=True)
class ChunkTask:
    index: int                 # the chunk's place among all chunks; names its files
    path: str                  # the source's file (for messages), or builtin:tasks
    key: str                   # data.train or data.validation.files
    span: Span | None = None   # a JSONL file's lines to read, else:
    records: list[SourceRecord] | None = None   # records read on the head (other kinds of source)
    fmt: str | None            # None: only read (the source's format is already an error)
    tokenize: bool             # False: read and convert only (a check after them fails anyway)
    max_length: int
    scratch: Path


@dataclass(frozen=True, kw_only=True)
class ChunkResult:
    index: int
    scratch: Path
    n_records: int = 0
    unreadable: list[Problem] = field(default_factory=list)   # decoding stopped here: the file's error
    malformed: list[Problem] = field(default_factory=list)    # every malformed line of the chunk
    misshapen: list[Problem] = field(default_factory=list)    # every record not of the format's shape
    rejected: list[Problem] = field(default_factory=list)     # the record the chat template refused
    n_truncated: int = 0
    n_without_answer: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # per kept example
    n_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # trained tokens per example

    def tokens(self, name: str) -> Path:
        """The file of the chunk's `name` ("ids" or "labels") tokens, end to end."""
        return self.scratch / f"{self.index}.{name}.npy"


def chunk_arrays(examples: list[TokenizedExample]) -> dict[str, np.ndarray]:
    lengths = np.fromiter((len(example) for example in examples), dtype=np.int64, count=len(examples))
    total = int(lengths.sum())
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=total)
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=total)
    trained = (labels != IGNORE_INDEX).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
    n_labels = np.add.reduceat(trained, starts) if total else np.zeros(len(lengths), dtype=np.int64)
    return {"ids": ids, "labels": labels, "lengths": lengths, "n_labels": n_labels}


def run_chunk(task: ChunkTask, tokenizer=None) -> ChunkResult:
    """`task`'s chunk, its token arrays written to `task.scratch` when it tokenizes."""
    tokenizer = tokenizer or _worker_tokenizer
    done = {"index": task.index, "scratch": task.scratch}
    try:
        if task.records is not None:
            records, malformed = task.records, []
        else:
            records, malformed = jsonl_records(Path(task.path), task.key, task.span)
    except DeepfleetError as exc:
        return ChunkResult(**done, unreadable=exc.problems)
    if malformed or task.fmt is None:
        return ChunkResult(**done, n_records=len(records), malformed=malformed)
    contents, misshapen = converted_records(records, task.fmt)
    if misshapen or not task.tokenize:
        return ChunkResult(**done, n_records=len(records), misshapen=misshapen)
    samples = [Sample(content=content, where=record.where) for content, record in zip(contents, records)]
    try:
        tokenized = tokenize_samples(tokenizer, samples, task.max_length)
    except DeepfleetError as exc:
        return ChunkResult(**done, n_records=len(records), rejected=exc.problems)
    arrays = chunk_arrays(tokenized.examples)
    result = ChunkResult(**done, n_records=len(records), n_truncated=tokenized.n_truncated,
                         n_without_answer=tokenized.n_without_answer, lengths=arrays["lengths"],
                         n_labels=arrays["n_labels"])
    for name in ("ids", "labels"):
        np.save(result.tokens(name), arrays[name])
    return result


def start_worker(model: ModelSpec) -> None:
    """A worker's one-time setup: its own tokenizer, without the tokenizers library's thread pool
    (the workers are the parallelism; its threads would only compete with them)."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from deepfleet.train.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(model)
