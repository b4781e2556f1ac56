"""How `bench train` results are shown: the seeds' scaling table (plus per-host step times) and a PNG."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from deepfleet.bench.scaling import NodeResult


def scaling_table(results: list[NodeResult]) -> Table:
    table = Table(title="scaling: real tokens/s, MFU, step time; efficiency = tok/s(N) / (N x tok/s(1))")
    for column in ("nodes", "ranks", "tok/s", "tok/s/node", "MFU", "step s", "efficiency", "step s per host",
                   "slowest"):
        table.add_column(column, justify="left" if column in ("step s per host", "slowest") else "right")
    for r in results:
        slow = r.slow_host
        table.add_row(str(r.nodes), str(r.ranks), f"{r.tokens_per_second:,.0f}", f"{r.tokens_per_second / r.nodes:,.0f}",
                      f"{r.mfu:.1%}", f"{r.mean_step_seconds:.3f}",
                      "" if r.scaling_efficiency is None else f"{r.scaling_efficiency:.0%}",
                      ", ".join(f"{h.host} {h.mean_step_seconds:.3f}" for h in r.hosts),
                      f"[bold red]{slow.host} (slow)[/]" if slow else r.slowest.host)
    peaks = list(dict.fromkeys(r.mfu_peak for r in results if r.mfu_peak))
    if peaks:
        table.caption = "MFU peak: " + "; ".join(peaks)
    return table


def scaling_json(results: list[NodeResult]) -> str:
    return json.dumps([{**asdict(r), "slow_host": r.slow_host.host if r.slow_host else None} for r in results])


def plot_scaling(results: list[NodeResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r.nodes for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(nodes, [r.tokens_per_second for r in results], "o-", label="measured")
    single = next((r for r in results if r.nodes == 1), None)
    if single:
        left.plot(nodes, [n * single.tokens_per_second for n in nodes], "--", color="gray", label="linear")
    left.set_xlabel("nodes")
    left.set_ylabel("real tokens/s")
    left.legend()
    left.grid(alpha=0.3)
    if single:
        right.bar([str(n) for n in nodes], [100 * (r.scaling_efficiency or 0) for r in results])
        right.set_ylabel("scaling efficiency (%)")
        right.set_ylim(0, 110)
    right.set_xlabel("nodes")
    right.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
