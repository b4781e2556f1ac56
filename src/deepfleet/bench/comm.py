"""Collective bandwidth, the nccl-tests way (pure): sizes, bus-bandwidth factors, results, the report line.

`size` is the full buffer in bytes, as in nccl-tests: the all-reduce buffer, the all-gather
output, the reduce-scatter input. algbw = size / time; busbw = algbw x factor, where the factor
makes the figure comparable to the link's bandwidth whatever the rank count:
all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from deepfleet.errors import DeepfleetError

OPERATIONS = ("all_reduce", "all_gather", "reduce_scatter")
RESULT_MARKER = "@@deepfleet-bench-comm "   # rank 0 prints this + one JSON object on stdout
DEFAULT_SIZES = "1KiB..1GiB"
UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 1000 ** 2,
         "GB": 1000 ** 3, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def bus_factor(operation: str, n_ranks: int) -> float:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown collective {operation!r}")
    if n_ranks < 1:
        raise ValueError("n_ranks must be >= 1")
    share = (n_ranks - 1) / n_ranks
    return 2 * share if operation == "all_reduce" else share


def algbw(size_bytes: int, seconds: float) -> float:
    """Bytes per second of the full buffer."""
    return size_bytes / seconds


def busbw(operation: str, size_bytes: int, seconds: float, n_ranks: int) -> float:
    return algbw(size_bytes, seconds) * bus_factor(operation, n_ranks)


def parse_size(text: str, where: str = "--sizes") -> int:
    match = SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in UNITS or int(match.group(1)) <= 0:
        raise DeepfleetError(f"cannot read size {text!r}", where=where,
                             fix="use a number with an optional unit: 4096, 64KiB, 16MiB, 1GiB")
    return int(match.group(1)) * UNITS[unit]


def parse_sizes(text: str, *, factor: int = 4) -> list[int]:
    """`1KiB..1GiB` (every `factor`-times step, both ends kept) or a list `1MiB,16MiB`."""
    if ".." in text:
        low_text, _, high_text = text.partition("..")
        low, high = parse_size(low_text), parse_size(high_text)
        if low > high:
            raise DeepfleetError(f"range {text!r} runs backwards", where="--sizes", fix="write it as SMALL..LARGE")
        sizes = []
        size = low
        while size < high:
            sizes.append(size)
            size *= factor
        return sizes + [high]
    sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    if not sizes:
        raise DeepfleetError("no sizes given", where="--sizes", fix="e.g. --sizes 1KiB..1GiB or 1MiB,64MiB")
    return sizes


def format_bytes(size: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(size)} B"


def peak_bytes_per_rank(size: int, n_ranks: int) -> int:
    """Memory one rank holds for the largest of the three collectives at `size` (buffer + its shard)."""
    return size + -(-size // n_ranks)


@dataclass(frozen=True, kw_only=True)
class Measurement:
    operation: str
    size_bytes: int
    iterations: int
    seconds: float           # mean per iteration, slowest rank (what algbw/busbw use, as nccl-tests)
    algbw: float             # bytes/s
    busbw: float             # bytes/s
    best_seconds: float      # fastest single iteration, slowest rank: robust to other load on the machine
    best_busbw: float        # bytes/s at best_seconds


@dataclass(frozen=True, kw_only=True)
class Skipped:
    operation: str
    size_bytes: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class CommReport:
    backend: str
    n_ranks: int
    n_hosts: int
    dtype: str
    measurements: list[Measurement]
    skipped: list[Skipped]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CommReport":
        data = json.loads(text)
        return cls(backend=data["backend"], n_ranks=data["n_ranks"], n_hosts=data["n_hosts"], dtype=data["dtype"],
                   measurements=[Measurement(**m) for m in data["measurements"]],
                   skipped=[Skipped(**s) for s in data["skipped"]])

    def best_busbw(self, operation: str) -> Measurement | None:
        rows = [m for m in self.measurements if m.operation == operation]
        return max(rows, key=lambda m: m.busbw) if rows else None


def measurement(operation: str, size_bytes: int, *, iterations: int, seconds: float, n_ranks: int,
                best_seconds: float) -> Measurement:
    return Measurement(operation=operation, size_bytes=size_bytes, iterations=iterations, seconds=seconds,
                       algbw=algbw(size_bytes, seconds), busbw=busbw(operation, size_bytes, seconds, n_ranks),
                       best_seconds=best_seconds, best_busbw=busbw(operation, size_bytes, best_seconds, n_ranks))


def iterations_for(warmup_seconds: float, *, budget_seconds: float, max_iterations: int) -> int:
    """Timed iterations that fit the per-size budget after one warm-up took `warmup_seconds` (>= 1)."""
    if warmup_seconds <= 0:
        return max_iterations
    return max(1, min(max_iterations, int(budget_seconds / warmup_seconds)))


def report_line(report: CommReport) -> str:
    return RESULT_MARKER + report.to_json()


def find_report(lines: list[str]) -> CommReport | None:
    """The report rank 0 printed, from streamed output lines (any prefix before the marker)."""
    for line in reversed(lines):
        at = line.find(RESULT_MARKER)
        if at >= 0:
            return CommReport.from_json(line[at + len(RESULT_MARKER):])
    return None
