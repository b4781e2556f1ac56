"""Rank 0's experiment trackers as one sink: open them, send each metrics record to all, keep what a
resume needs in output_dir/trackers.json, and never let a tracker's failure stop training.

Resume: trackers.json holds each tracker's run reference and the last step of each record kind it
was sent. Training that continues from a checkpoint continues the same tracker runs; training that
starts at step 0 (first run, `resume: false`, or a failure before the first checkpoint) starts new
ones. Steps after the checkpoint that the failed attempt had already sent are trained again but not
sent again to trackers that cannot replace a step (W&B, MLflow): those keep the first attempt's
values for them, and every step appears once. TensorBoard replaces them (`purge_step`), like
metrics.jsonl. A kill between a tracker's log call and the trackers.json write can leave that one
step sent twice.

Failure: any exception from a tracker (library missing on this host, server gone, bad key) prints
one warning line and stops that tracker; metrics.jsonl and the other trackers go on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from deepfleet.errors import exception_summary
from deepfleet.plan.recipe import Recipe
from deepfleet.train.trackers import TRACKER_TYPES, Tracker, TrackerRun, tracker_values

TRACKERS_FILE = "trackers.json"


def warn_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Trackers:
    def __init__(self, trackers: list[Tracker], *, state_path: Path, sent: dict[str, dict[str, int]],
                 references: dict[str, dict[str, Any]], warn: Callable[[str], None] = warn_on_stderr):
        self.active = list(trackers)
        # Every tracker's run, also one that failed (now or earlier): a resume continues it rather than
        # starting another.
        self.references = references
        self.state_path = state_path
        self.sent = sent           # tracker name -> record kind -> last step sent
        self.warn = warn
        self._save()

    @classmethod
    def open(cls, names: tuple[str, ...], run: TrackerRun, *, warn: Callable[[str], None] = warn_on_stderr,
             types: dict[str, type] = TRACKER_TYPES) -> "Trackers":
        state_path = run.output_dir / TRACKERS_FILE
        previous = read_tracker_state(state_path) if run.resume_after_step else {}
        opened, sent, references = [], {}, {}
        for name in names:
            kept = previous.get(name, {})
            sent[name], reference = dict(kept.get("sent", {})), kept.get("run")
            try:
                opened.append(types[name](run, reference))
                reference = opened[-1].reference()
            except Exception as exc:   # noqa: BLE001 - any tracker failure must leave training running
                warn(_warning(name, "could not start", exc))
            if reference is not None:
                references[name] = reference
        return cls(opened, state_path=state_path, sent=sent, references=references, warn=warn)

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics.jsonl record ("train" or "validation") to every tracker that lacks its step."""
        step, kind = record["step"], record["kind"]
        values = tracker_values(record)
        changed = False
        for tracker in list(self.active):
            last = self.sent[tracker.name].get(kind, 0)
            if step <= last and not tracker.rewrites_steps:
                continue
            if self._call(tracker, "stopped", tracker.log, values, step):
                self.sent[tracker.name][kind] = step
                changed = True
        if changed:
            self._save()

    def finish(self, final_dir: Path | None) -> None:
        """End every tracker's run: finished with the final model dir, or stopped (None) to be continued."""
        for tracker in list(self.active):
            self._call(tracker, "could not finish", tracker.finish, final_dir)
        self.active = []

    def _call(self, tracker: Tracker, failure: str, method: Callable, *args) -> bool:
        try:
            method(*args)
            return True
        except Exception as exc:   # noqa: BLE001 - see the module docstring
            self.warn(_warning(tracker.name, failure, exc))
            self.active.remove(tracker)
            return False

    def _save(self) -> None:
        state = {name: {"run": reference, "sent": self.sent[name]} for name, reference in self.references.items()}
        if not state and not self.state_path.exists():
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.state_path)


def _warning(name: str, failure: str, exc: BaseException) -> str:
    return (f"warning: {name} tracker {failure} ({exception_summary(exc)}); training goes on without it, "
            "metrics.jsonl has every step")


def read_tracker_state(path: Path) -> dict[str, Any]:
    """trackers.json, or {} when it is missing or unreadable (then the trackers start new runs)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def open_trackers(recipe: Recipe, *, ds_config: dict, run_info: dict[str, Any], resume_after_step: int,
                  warn: Callable[[str], None] = warn_on_stderr) -> Trackers:
    """The recipe's trackers for this attempt; config is the resolved recipe (without env), the DeepSpeed
    config and what this attempt's MFU divides by."""
    logging = recipe.logging
    output_dir = recipe.output_path.resolve()
    run = TrackerRun(output_dir=output_dir, run_name=logging.run_name or output_dir.name, tags=tuple(logging.tags),
                     project=logging.project, upload_model=logging.upload_model, resume_after_step=resume_after_step,
                     config={"recipe": recipe.model_dump(mode="json", exclude={"env"}), "deepspeed": ds_config,
                             "run": run_info})
    return Trackers.open(logging.enabled_trackers, run, warn=warn)
