"""How a comm report is shown: a rich table (one row per size, a column pair per collective) and a PNG."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from deepfleet.bench.comm import OPERATIONS, CommReport, Skipped, format_bytes

GB = 1e9   # nccl-tests prints GB/s as 1e9 bytes per second


def comm_table(report: CommReport) -> Table:
    """One row per collective and size, as nccl-tests prints them; skipped sizes say why."""
    table = Table(title=f"{report.backend}: {report.n_ranks} ranks on {report.n_hosts} host(s), {report.dtype} "
                        "; bandwidths in GB/s (1e9 B/s), nccl-tests definitions")
    for column, justify in (("collective", "left"), ("size", "right"), ("iters", "right"), ("time", "right"),
                            ("algbw", "right"), ("busbw", "right"),
                            ("best busbw", "right")):
        table.add_column(column, justify=justify, style="bold" if column == "busbw" else None)
    for op in OPERATIONS:
        rows = [m for m in report.measurements if m.operation == op]
        rows += [s for s in report.skipped if s.operation == op]
        for row in sorted(rows, key=lambda r: r.size_bytes):
            if isinstance(row, Skipped):
                table.add_row(op, format_bytes(row.size_bytes), "", f"skipped: {row.reason}", "", "", "")
            else:
                table.add_row(op, format_bytes(row.size_bytes), str(row.iterations), format_seconds(row.seconds),
                              f"{row.algbw / GB:.3f}", f"{row.busbw / GB:.3f}", f"{row.best_busbw / GB:.3f}")
    return table


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def summary_line(report: CommReport) -> str:
    best = report.best_busbw("all_reduce")
    if best is None:
        return "no all-reduce measured"
    return f"peak all-reduce busbw {best.busbw / GB:.3f} GB/s at {format_bytes(best.size_bytes)}"


def plot_comm(report: CommReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for op in OPERATIONS:
        rows = sorted((m for m in report.measurements if m.operation == op), key=lambda m: m.size_bytes)
        if rows:
            axis.plot([m.size_bytes for m in rows], [m.busbw / GB for m in rows], "o-", label=op)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("size (bytes)")
    axis.set_ylabel("bus bandwidth (GB/s)")
    axis.set_title(f"{report.backend}, {report.n_ranks} ranks on {report.n_hosts} host(s)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
