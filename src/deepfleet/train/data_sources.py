"""Reading training data: JSONL, JSON, parquet, a saved HF dataset dir, or `builtin:tasks`.

Every record keeps where it came from (`file:line` for JSONL, `file record N` otherwise), so a
later problem with its shape can point at it. Unreadable files and malformed JSONL lines are
`DeepfleetError`s; all malformed lines are collected before raising (the first few are listed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.train.builtin import BUILTIN_DATA_NAME, BUILTIN_TRAIN_RECORDS, builtin_task_records
from deepfleet.user_text import read_user_text, user_text_lines

MAX_LISTED_PROBLEMS = 5
BUILTIN_VALIDATION_RECORDS = 256
SUPPORTED = ".jsonl, .json, .parquet, a saved HF dataset dir, or builtin:tasks"


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    fields: dict[str, Any]
    where: str      # file:line (JSONL) or "file record N"; for error messages


def capped_problems(problems: list[Problem], *, fix: str) -> list[Problem]:
    """The first few problems, plus one line saying how many more there were."""
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    hidden = len(problems) - MAX_LISTED_PROBLEMS
    where = problems[MAX_LISTED_PROBLEMS].where
    return [*problems[:MAX_LISTED_PROBLEMS],
            Problem(what=f"... and {hidden} more like these", where=where, fix=fix)]


def _path_fix(key: str) -> str:
    return f"check the path and permissions in {key} (relative paths are from the current directory)"


def _unreadable(path: Path, reason: str, key: str) -> DeepfleetError:
    return DeepfleetError(f"cannot read data file: {reason}", where=str(path), fix=_path_fix(key))


def _jsonl_line(line: str, where: str, records: list[SourceRecord]) -> str:
    """Append the line's record to `records`; return what is wrong with it, or ''."""
    if not line.strip():
        return ""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"malformed JSON line: {exc.msg} (column {exc.colno})"
    if not isinstance(value, dict):
        return f"line is a JSON {type(value).__name__}, not an object"
    records.append(SourceRecord(fields=value, where=where))
    return ""


JSONL_FIX = "make each line one JSON object, e.g. {\"messages\": [...]}"
Span = tuple[int, int, int]    # start byte, stop byte, line number at start: a run of whole lines


def jsonl_records(path: Path, key: str, span: Span | None = None) -> tuple[list[SourceRecord], list[Problem]]:
    """The records of a JSONL file (or of `span` of it) and every malformed line, not raised; a file
    that cannot be read or decoded raises."""
    records: list[SourceRecord] = []
    problems: list[Problem] = []
    for number, line in user_text_lines(path, "data file", fix=_path_fix(key), span=span):   # streamed
        problem = _jsonl_line(line, f"{path}:{number}", records)
        if problem:
            problems.append(Problem(what=problem, where=f"{path}:{number}", fix=JSONL_FIX))
    return records, problems


def read_jsonl(path: Path, key: str) -> list[SourceRecord]:
    records, problems = jsonl_records(path, key)
    if problems:
        raise DeepfleetError(problems=capped_problems(problems, fix=JSONL_FIX))
    return records


def first_jsonl_record(path: Path, key: str) -> SourceRecord | None:
    """The first record of a JSONL file, reading no further (None: it has none)."""
    records: list[SourceRecord] = []
    for number, line in user_text_lines(path, "data file", fix=_path_fix(key)):
        if not _jsonl_line(line, f"{path}:{number}", records) and records:
            return records[0]
    return None


def jsonl_spans(path: Path, chunk_bytes: int) -> list[Span]:
    """`path` cut into runs of whole lines of about `chunk_bytes` each, with the line each starts on."""
    spans: list[Span] = []
    start, line = 0, 1
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            block += handle.readline()
            spans.append((start, start + len(block), line))
            start, line = start + len(block), line + block.count(b"\n")
    return spans


def element_lines(text: str) -> list[int]:
    """The line each element of the top-level JSON array in `text` starts on (`text` is known to parse)."""
    decoder, between = json.JSONDecoder(), re.compile(r"[\s,]*")
    lines, line, counted = [], 1, 0
    index = between.match(text, text.index("[") + 1).end()
    while text[index] != "]":
        line += text.count("\n", counted, index)
        lines.append(line)
        counted = index
        index = between.match(text, decoder.raw_decode(text, index)[1]).end()
    return lines


def read_json(path: Path, key: str) -> list[SourceRecord]:
    text = read_user_text(path, "data file", fix=_path_fix(key))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepfleetError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}",
                             fix="fix the JSON, or use JSONL (one object per line)") from None
    if not isinstance(value, list):
        raise DeepfleetError(f"a .json data file must hold a list of records, not a {type(value).__name__}",
                             where=str(path), fix="write [ {...}, {...} ] or use JSONL (one object per line)")
    return _records_from_rows(value, [f"{path}:{line}" for line in element_lines(text)])


def _records_from_rows(rows: list[Any], wheres: list[str]) -> list[SourceRecord]:
    """`wheres`: where each row is (file:line, or `file record N` where a file has no lines)."""
    records: list[SourceRecord] = []
    problems: list[Problem] = []
    for row, where in zip(rows, wheres):
        if isinstance(row, dict):
            records.append(SourceRecord(fields=row, where=where))
        else:
            problems.append(Problem(what=f"record is a {type(row).__name__}, not an object",
                                    where=where, fix="make each record a JSON object"))
    if problems:
        raise DeepfleetError(problems=capped_problems(problems, fix="make each record a JSON object"))
    return records


def read_parquet(path: Path, key: str) -> list[SourceRecord]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as exc:
        raise _unreadable(path, str(exc).splitlines()[0], key) from None
    return _records_from_rows(rows, _numbered(path, len(rows)))


def _numbered(path: Path, count: int) -> list[str]:
    return [f"{path} record {index}" for index in range(1, count + 1)]


def read_dataset_dir(path: Path, key: str) -> list[SourceRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DeepfleetError(f"directory is not a saved HF dataset ({str(exc).splitlines()[0]})", where=str(path),
                             fix="save it with Dataset.save_to_disk, or point at a .jsonl/.json/.parquet file") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DeepfleetError(f"saved DatasetDict has splits {splits} and none is 'train'", where=str(path),
                                 fix="save the split you want to train on by itself, or name it 'train'")
        loaded = loaded["train"] if "train" in loaded else loaded[splits[0]]
    rows = loaded.to_list()
    return _records_from_rows(rows, _numbered(path, len(rows)))


def read_builtin(*, seed: int, validation: bool) -> list[SourceRecord]:
    if validation:
        rows = builtin_task_records(BUILTIN_VALIDATION_RECORDS, seed=seed, split="heldout")
    else:
        rows = builtin_task_records(BUILTIN_TRAIN_RECORDS, seed=seed, split="train")
    name = f"{BUILTIN_DATA_NAME}[{'heldout' if validation else 'train'}]"
    return [SourceRecord(fields=row, where=f"{name} record {index}") for index, row in enumerate(rows, start=1)]


READERS: dict[str, Callable[[Path, str], list[SourceRecord]]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def source_path(source: str, key: str) -> Path:
    """The path of a data source that is not built in, checked to exist and to be a kind deepfleet reads."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DeepfleetError("data file not found", where=str(path),
                             fix=f"check {key} (relative paths are from the current directory)")
    if not path.is_dir() and path.suffix not in READERS:
        raise DeepfleetError(f"unsupported data file type {path.suffix or '(none)'!r}", where=str(path),
                             fix=f"use {SUPPORTED}")
    return path


def read_source(source: str, *, key: str, seed: int, validation: bool = False) -> list[SourceRecord]:
    """All records of one entry of `data.train` (or `data.validation.files`, which `key` names).

    `builtin:tasks` gives the built-in training records, or, as a validation source, held-out ones.
    """
    if source == BUILTIN_DATA_NAME:
        return read_builtin(seed=seed, validation=validation)
    path = source_path(source, key)
    records = read_dataset_dir(path, key) if path.is_dir() else READERS[path.suffix](path, key)
    if not records:
        raise DeepfleetError("data file holds no records", where=str(path),
                             fix=f"add records or remove it from {key}")
    return records
