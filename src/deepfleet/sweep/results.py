"""The sweep's results: every trial's final validation loss and tokens/s (from its metrics.jsonl) and
how it ended, ranked by validation loss (trials without one last, with a note), written as
results.md, results.csv, results.json and results.png."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from deepfleet.sweep.grid import Trial
from deepfleet.sweep.sweep_dir import DONE, SweepLayout, TrialStatus, write_json_atomically
from deepfleet.train.metrics import METRICS_FILE

NOT_RUN = "not run"


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    id: str
    overrides: str
    status: str                       # done, failed, interrupted, not run
    exit_code: int | None
    val_loss: float | None            # the last validation record's
    tokens_per_second: float | None   # median over the logged training steps
    steps: int | None                 # the last training step logged
    seconds: float | None
    note: str = ""


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short by a killed run is left out."""
    records = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def trial_result(trial: Trial, status: TrialStatus | None, records: Sequence[dict[str, Any]]) -> TrialResult:
    train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("tokens_per_second"), (int, float))]
    validation = [r for r in records if r.get("kind") == "validation" and isinstance(r.get("val_loss"), (int, float))]
    val_loss = float(validation[-1]["val_loss"]) if validation else None
    if status is None:
        note = NOT_RUN
    elif status.status != DONE:
        note = status.error or f"{status.status} (exit code {status.exit_code})"
    elif val_loss is None:
        note = "no validation loss (the recipe has no data.validation split or files): ranked last"
    else:
        note = ""
    return TrialResult(id=trial.id, overrides=trial.label, status=status.status if status else NOT_RUN,
                       exit_code=status.exit_code if status else None, val_loss=val_loss,
                       tokens_per_second=statistics.median(r["tokens_per_second"] for r in train) if train else None,
                       steps=int(train[-1]["step"]) if train else None, seconds=status.seconds if status else None,
                       note=note)


def ranked(results: Sequence[TrialResult]) -> list[TrialResult]:
    """Finished trials by validation loss, lowest first; then finished ones without it, then the rest
    (each group in sweep order)."""
    def key(item: tuple[int, TrialResult]) -> tuple:
        order, result = item
        group = 0 if result.status == DONE and result.val_loss is not None else 1 if result.status == DONE else 2
        return group, result.val_loss if group == 0 else 0.0, order
    return [result for _, result in sorted(enumerate(results), key=key)]


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


COLUMNS = ("rank", "trial", "overrides", "status", "val loss", "tokens/s", "steps", "seconds", "note")


def table_rows(results: Sequence[TrialResult]) -> list[list[str]]:
    """The ranked table as text cells (the console table and results.md)."""
    return [[str(rank), r.id, r.overrides, r.status + (f" ({r.exit_code})" if r.exit_code else ""),
             _number(r.val_loss, 4), _number(r.tokens_per_second, 0), "" if r.steps is None else str(r.steps),
             _number(r.seconds, 0), r.note] for rank, r in enumerate(results, start=1)]


def results_markdown(results: Sequence[TrialResult]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def results_csv(results: Sequence[TrialResult]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", *asdict(results[0]).keys()] if results else ["rank"])
    for rank, result in enumerate(results, start=1):
        writer.writerow([rank, *("" if v is None else v for v in asdict(result).values())])
    return out.getvalue()


def plot_results(results: Sequence[TrialResult], png: Path) -> None:
    """Validation loss per trial, best at the top, with tokens/s beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(results)[::-1]   # barh draws the first bar at the bottom
    labels = [f"{r.id}  {r.overrides}" for r in shown]
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, sharey=True,
                                                  figsize=(11, 1.2 + 0.45 * max(len(shown), 1)))
    loss_axis.barh(labels, [r.val_loss or 0.0 for r in shown], color=["tab:blue" if r.val_loss is not None
                                                                       else "lightgray" for r in shown])
    for index, result in enumerate(shown):
        text = f"{result.val_loss:.4f}" if result.val_loss is not None else f"no val loss ({result.status})"
        loss_axis.text(result.val_loss or 0.0, index, f" {text}", va="center", fontsize=8)
    loss_axis.set_xlabel("final validation loss (lower is better)")
    speed_axis.barh(labels, [r.tokens_per_second or 0.0 for r in shown], color="tab:green")
    speed_axis.set_xlabel("tokens/s (median step)")
    for axis in (loss_axis, speed_axis):
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle("sweep trials, ranked by validation loss")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def write_results(layout: SweepLayout, results: Sequence[TrialResult]) -> None:
    """results.md, .csv, .json and .png in the sweep dir, each replaced whole."""
    for suffix, text in (("md", results_markdown(results)), ("csv", results_csv(results))):
        tmp = layout.results(suffix).with_suffix(f".{suffix}.tmp")
        tmp.write_text(text)
        tmp.replace(layout.results(suffix))
    write_json_atomically(layout.results("json"), [{"rank": rank, **asdict(r)} for rank, r in
                                                   enumerate(results, start=1)])
    tmp = layout.results("png").with_suffix(".tmp.png")
    plot_results(results, tmp)
    tmp.replace(layout.results("png"))


def collect_results(layout: SweepLayout, trials: Sequence[Trial], statuses: dict[str, TrialStatus | None]
                    ) -> list[TrialResult]:
    return ranked([trial_result(t, statuses.get(t.id), read_records(layout.trial_dir(t.id) / METRICS_FILE))
                   for t in trials])
