"""Experiment tracker adapters on rank 0: TensorBoard, Weights & Biases, MLflow (`logging.trackers`).

Each adapter is one small class with the same four members: `open` (start a run, or continue the
one whose reference `previous` holds), `reference` (what trackers.json keeps to continue it), `log`
and `finish`. Errors are not handled here: `tracker_set.Trackers` catches them, warns once and
stops that tracker, so training never fails because a tracker did. The libraries are imported
only when their tracker is configured (mlflow alone takes about 2 s to import).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deepfleet.contract import EXIT_PREEMPTED, JOB_ID_ENV

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"                       # W&B writes output_dir/wandb/ (offline runs, logs)
DEFAULT_PROJECT = "deepfleet"
FINAL_MODEL_KEY = "final_model_dir"       # W&B summary key and (as deepfleet.final_model_dir) MLflow tag
MLFLOW_TAG_PREFIX = "deepfleet."
MLFLOW_PARAM_BATCH = 100                  # MLflow's limit of params per log_batch call
MLFLOW_PARAM_VALUE_LIMIT = 6000           # MLflow's limit of characters in a param value
# MLflow's HTTP client retries with backoff for minutes by default; a lost server must cost rank 0
# seconds (the supervisor's hang timeout counts), so these bound it unless the user set them.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(frozen=True, kw_only=True)
class TrackerRun:
    """What every tracker is told about the run."""

    output_dir: Path
    run_name: str
    tags: tuple[str, ...] = ()
    project: str | None = None                # None: the tracker's own environment variable, else DEFAULT_PROJECT
    config: dict[str, Any] = field(default_factory=dict)   # {"recipe": ..., "deepspeed": ..., "run": ...}
    upload_model: bool = False
    resume_after_step: int = 0                # the checkpoint step training continues from (0: a fresh run)


class Tracker(Protocol):
    name: str
    rewrites_steps: bool    # True: a step logged again replaces the old one; False: steps already held are not resent

    def reference(self) -> dict[str, Any] | None: ...
    def log(self, values: dict[str, float], step: int) -> None: ...
    def finish(self, final_dir: Path | None) -> None: ...


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: train fields as `train/<field>`, validation ones as they are,
    lists (per-rank step seconds) as `<name>/<index>`; strings, None and non-finite numbers left out."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        name = key if key.startswith("val") else f"train/{key}"
        items = [(f"{name}/{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(name, value)]
        values.update((n, float(v)) for n, v in items
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    return values


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as `a.b.c` -> text (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = (value if isinstance(value, str) else json.dumps(value))[:MLFLOW_PARAM_VALUE_LIMIT]
    return flat


class TensorBoardTracker:
    """Event files in output_dir/tensorboard. On resume, TensorBoard's `purge_step` hides the old
    attempt's events after the checkpoint, so the retrained steps replace them (as in metrics.jsonl)."""

    name = "tensorboard"
    rewrites_steps = True

    def __init__(self, run: TrackerRun, previous: dict[str, Any] | None):
        from torch.utils.tensorboard import SummaryWriter

        self.board = SummaryWriter(str(run.output_dir / TENSORBOARD_DIR),
                                   purge_step=run.resume_after_step + 1 if run.resume_after_step else None)

    def reference(self) -> dict[str, Any] | None:
        return None

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.board.add_scalar(key, value, step)
        self.board.flush()   # its own flush is every 2 minutes: a killed run would lose them

    def finish(self, final_dir: Path | None) -> None:
        self.board.close()


class WandbTracker:
    """A W&B run (online, or files under output_dir/wandb with WANDB_MODE=offline), continued by id
    (`resume="allow"`). W&B refuses steps below its current one, so steps it already holds are not resent."""

    name = "wandb"
    rewrites_steps = False

    def __init__(self, run: TrackerRun, previous: dict[str, Any] | None):
        import wandb

        (run.output_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        # W&B writes through a wandb-core process that rank 0 starts. A graceful stop SIGTERMs every
        # process marked with the job's id, and wandb-core would die at once, losing what rank 0 logs
        # while it checkpoints and finishes. Unmarked, it outlives that wave; it ends by itself when
        # rank 0 does (wandb passes it rank 0's pid), so no process outlives the job.
        marker = os.environ.pop(JOB_ID_ENV, None)
        try:
            # console="off": rank 0's output already reaches the head's console and logs; W&B's capture
            # would wrap sys.stdout under the supervisor's line streaming.
            self.run = wandb.init(project=run.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                                  name=run.run_name, tags=list(run.tags) or None, dir=str(run.output_dir),
                                  id=(previous or {}).get("run_id"), resume="allow",
                                  settings=wandb.Settings(console="off"))
        finally:
            if marker is not None:
                os.environ[JOB_ID_ENV] = marker
        self.run.config.update(run.config, allow_val_change=True)
        self.upload_model = run.upload_model

    def reference(self) -> dict[str, Any] | None:
        return {"run_id": self.run.id}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, final_dir: Path | None) -> None:
        import wandb

        if final_dir is not None:
            self.run.summary[FINAL_MODEL_KEY] = str(final_dir)
            artifact = wandb.Artifact(f"{self.run.id}-model", type="model",
                                      metadata={"host": socket.gethostname(), "path": str(final_dir)})
            if self.upload_model:
                artifact.add_dir(str(final_dir))
            else:   # a reference: W&B records the path, uploads and hashes nothing
                artifact.add_reference(final_dir.resolve().as_uri(), checksum=False)
            self.run.log_artifact(artifact)
            self.run.finish(exit_code=0)
        else:   # stopped after a checkpoint, to be resumed
            self.run.mark_preempting()
            self.run.finish(exit_code=EXIT_PREEMPTED)


class MlflowTracker:
    """An MLflow run at $MLFLOW_TRACKING_URI, through `MlflowClient` (no global active run), continued
    by run id. MLflow would keep a step logged twice as two values, so steps it holds are not resent."""

    name = "mlflow"
    rewrites_steps = False

    def __init__(self, run: TrackerRun, previous: dict[str, Any] | None):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.upload_model = run.upload_model
        self.run_id = self._continued_run((previous or {}).get("run_id"))
        if self.run_id is None:
            experiment = run.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {**{tag: "" for tag in run.tags}, f"{MLFLOW_TAG_PREFIX}output_dir": str(run.output_dir),
                    f"{MLFLOW_TAG_PREFIX}host": socket.gethostname()}
            self.run_id = self.client.create_run(experiment_id, run_name=run.run_name, tags=tags).info.run_id
            params = [Param(key, value) for key, value in flat_config(run.config).items()]
            for start in range(0, len(params), MLFLOW_PARAM_BATCH):
                self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAM_BATCH])

    def _continued_run(self, run_id: str | None) -> str | None:
        """The previous attempt's run, marked running again; None when there is none (or the server lost it)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def reference(self) -> dict[str, Any] | None:
        return {"run_id": self.run_id}

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def finish(self, final_dir: Path | None) -> None:
        if final_dir is not None:
            self.client.set_tag(self.run_id, f"{MLFLOW_TAG_PREFIX}{FINAL_MODEL_KEY}", str(final_dir))
            if self.upload_model:
                self.client.log_artifacts(self.run_id, str(final_dir), "model")
        self.client.set_terminated(self.run_id, "FINISHED" if final_dir is not None else "KILLED")


TRACKER_TYPES: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
