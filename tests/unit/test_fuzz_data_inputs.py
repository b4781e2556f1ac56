"""Fuzz the data readers and record formats (messages, alpaca, sharegpt, text in .jsonl, .json and .parquet):
any mutation of valid records ends in conversations/texts or a DeepfleetError, never another exception."""

import json
import tempfile
from pathlib import Path

import pyarrow
import pyarrow.parquet
from hypothesis import assume, example, given, strategies as st

from deepfleet.train.data_formats import FORMAT_KEYS, convert_records, detect_format
from deepfleet.train.data_sources import read_source
from fuzz_inputs import damaged, mutated, outcome

VALID_RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}]},
    "alpaca": {"instruction": "Reverse", "input": "abc", "output": "cba", "system": "s"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "text": {"text": "plain text"},
}
record_format = st.sampled_from(sorted(VALID_RECORDS))


def read_and_convert(path: Path, fmt: str) -> None:
    records = read_source(str(path), key="data.train", seed=0)
    convert_records(records, detect_format(records[0]) if fmt == "auto" else fmt)


@st.composite
def jsonl_text(draw):
    lines = [json.dumps(draw(mutated(VALID_RECORDS[draw(record_format)])), ensure_ascii=False)
             for _ in range(draw(st.integers(1, 3)))]
    return damaged(draw, "\n".join(lines) + "\n")


@st.composite
def json_text(draw):
    rows = draw(mutated([VALID_RECORDS[draw(record_format)] for _ in range(draw(st.integers(1, 3)))]))
    return damaged(draw, json.dumps(rows, ensure_ascii=draw(st.booleans())))


def _checked(suffix: str, write, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        write(path)
        outcome(lambda: read_and_convert(path, fmt))


@given(jsonl_text(), st.sampled_from(["auto", *FORMAT_KEYS]))
@example('{"messages": [{"role": "user", "content": "a"}]}\n\ufeff{"text": "b"}\n', "auto")
def test_fuzz_jsonl_records(text, fmt):
    _checked(".jsonl", lambda path: path.write_text(text, encoding="utf-8", errors="surrogatepass"), fmt)


@given(json_text(), st.sampled_from(["auto", *FORMAT_KEYS]))
def test_fuzz_json_records(text, fmt):
    _checked(".json", lambda path: path.write_text(text, encoding="utf-8", errors="surrogatepass"), fmt)


def _parquet_bytes(rows: list) -> bytes | None:
    """The rows as a parquet file, or None when pyarrow cannot store them at all."""
    sink = pyarrow.BufferOutputStream()
    try:
        table = pyarrow.Table.from_pylist([row if isinstance(row, dict) else {"value": row} for row in rows])
        pyarrow.parquet.write_table(table, sink)
    except (pyarrow.ArrowException, OverflowError, TypeError, ValueError):
        return None
    return sink.getvalue().to_pybytes()


@given(st.lists(record_format.flatmap(lambda fmt: mutated(VALID_RECORDS[fmt])), min_size=1, max_size=3),
       st.sampled_from(["auto", *FORMAT_KEYS]))
def test_fuzz_parquet_records(rows, fmt):
    data = _parquet_bytes(rows)
    assume(data is not None)
    _checked(".parquet", lambda path: path.write_bytes(data), fmt)


@given(st.binary(max_size=64))
def test_fuzz_parquet_bytes(data):
    _checked(".parquet", lambda path: path.write_bytes(b"PAR1" + data + b"PAR1"), "auto")
