"""`bench train` figures from metrics.jsonl (pure): tokens/s, MFU, per-host step time, scaling efficiency.

Scaling efficiency is tokens/s(N) / (N x tokens/s(1)), as in the seeds' 1/2/4/8-node table. Global
rank r runs on host r // ranks_per_host (torchrun's static rendezvous numbers nodes by --node-rank).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from deepfleet.errors import DeepfleetError

# A host whose mean step time is this much above the fastest host's is called out as slow.
SLOW_HOST_MARGIN = 0.10


def parse_node_counts(text: str, *, fleet_size: int) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise DeepfleetError(f"cannot read node counts {text!r}", where="--nodes", fix="e.g. --nodes 1,2,4") from None
    if not counts or counts[0] < 1:
        raise DeepfleetError(f"node counts must be >= 1, got {text!r}", where="--nodes", fix="e.g. --nodes 1,2,4")
    if counts[-1] > fleet_size:
        raise DeepfleetError(f"{counts[-1]} nodes asked for, the fleet has {fleet_size}", where="--nodes",
                             fix=f"use counts up to {fleet_size}, or add hosts to the fleet")
    return counts


@dataclass(frozen=True, kw_only=True)
class HostStep:
    host: str
    mean_step_seconds: float


@dataclass(frozen=True, kw_only=True)
class NodeResult:
    nodes: int
    ranks: int
    timed_steps: int
    tokens_per_second: float
    mfu: float
    mean_step_seconds: float          # slowest rank per step, averaged
    mfu_peak: str                     # the peak MFU divides by, as the run's metrics.jsonl names it
    hosts: list[HostStep]
    scaling_efficiency: float | None = None

    @property
    def slowest(self) -> HostStep:
        return max(self.hosts, key=lambda h: h.mean_step_seconds)

    @property
    def slow_host(self) -> HostStep | None:
        """The slowest host when it is clearly slower than the fastest one."""
        fastest = min(h.mean_step_seconds for h in self.hosts)
        slowest = self.slowest
        return slowest if len(self.hosts) > 1 and slowest.mean_step_seconds > fastest * (1 + SLOW_HOST_MARGIN) else None


def summarize(records: Sequence[dict[str, Any]], *, nodes: int, hosts: Sequence[str], ranks_per_host: int,
              warmup_steps: int) -> NodeResult:
    """One node count's figures from its metrics.jsonl records, leaving out the first warmup steps."""
    train = [r for r in records if r.get("kind") == "train"]
    timed = [r for r in train if r["step"] > warmup_steps] or train[-1:]
    if not timed:
        raise DeepfleetError(f"no training steps recorded for {nodes} node(s)", where="metrics.jsonl",
                             fix="raise --steps, or read the run's logs")
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["step_seconds"] for r in timed)
    per_rank = list(zip(*(r["rank_step_seconds"] for r in timed)))
    host_steps = []
    for index, host in enumerate(hosts):
        ranks = per_rank[index * ranks_per_host:(index + 1) * ranks_per_host]
        host_steps.append(HostStep(host=host, mean_step_seconds=statistics.mean(v for rank in ranks for v in rank)))
    return NodeResult(nodes=nodes, ranks=len(per_rank), timed_steps=len(timed), tokens_per_second=tokens / seconds,
                      mfu=statistics.mean(r["mfu"] for r in timed), mean_step_seconds=seconds / len(timed),
                      mfu_peak=next((r.get("peak", "") for r in records if r.get("kind") == "run"), ""),
                      hosts=host_steps)


def with_efficiency(results: list[NodeResult]) -> list[NodeResult]:
    """Scaling efficiency against the 1-node result (None without one)."""
    single = next((r for r in results if r.nodes == 1), None)
    if single is None:
        return results
    return [NodeResult(**{**vars(r), "scaling_efficiency": r.tokens_per_second / (r.nodes * single.tokens_per_second)})
            for r in results]
