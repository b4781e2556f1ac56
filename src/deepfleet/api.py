"""deepfleet from Python (a notebook, a script): the same steps as the commands, as functions.

    import deepfleet as df
    recipe = df.load_recipe("recipe.yaml", overrides={"train.lr": 1e-4})
    print(df.plan(recipe).table())
    result = df.train(recipe, fleet="fleet.yaml")   # blocks; result.exit_code, .final_dir, .metrics
    df.export(result.run_dir, to="out/")

Problems raise `deepfleet.DeepfleetError`. Training never runs in the calling process: the ranks
are separate processes under the same supervisor as `deepfleet train`, so a notebook kernel never
hangs in a collective, and a kernel's own event loop is left alone.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import Recipe


def load_recipe(path: str | Path | None = None, overrides: Mapping[str, Any] | list[str] | None = None) -> Recipe:
    """A checked recipe from a YAML file (None: the built-in defaults), with `{"train.lr": 1e-4}` or
    `["train.lr=1e-4"]` overrides applied."""
    from deepfleet.plan.recipe_io import load_recipe as load

    if isinstance(overrides, Mapping):
        overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for key, value in overrides.items()]
    return load(path, list(overrides or []))


def plan(recipe: Recipe, fleet: str | None = None, *, nodes: int | None = None, gpus_per_node: int | None = None,
         gpu_mem: str | None = None, host_mem: str | None = None, link_gbps: float | None = None,
         bf16: bool | None = None, facts_file: str | None = None):
    """Memory per ZeRO stage and offload, the chosen setting and its DeepSpeed config, for `fleet` (a
    fleet.yaml or hostfile; None: as `deepfleet plan` finds it; its hosts asked over ssh, or their facts
    read from `facts_file`, a `deepfleet doctor --record` file) or for `nodes` x `gpus_per_node`.
    Returns a `prepare.PlanReport`: .table(), .deepspeed_config, .commands, .resolved.plan."""
    from deepfleet.prepare import build_plan

    return build_plan(recipe, fleet, nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem=gpu_mem, host_mem=host_mem,
                      link_gbps=link_gbps, bf16=bf16, facts_file=facts_file)


@dataclass(frozen=True)
class TrainResult:
    exit_code: int             # 0 done; 75 stopped by a signal after a checkpoint (train again to resume)
    run_dir: Path              # the recipe's output_dir
    seconds: float

    @property
    def final_dir(self) -> Path | None:
        final = self.run_dir / "final"
        return final if self.exit_code == 0 and final.is_dir() else None

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl's records: the run's (MFU peak), then training steps and validations."""
        from deepfleet.train.metrics import METRICS_FILE, read_metrics

        path = self.run_dir / METRICS_FILE
        return read_metrics(path) if path.is_file() else []


def train(recipe: Recipe, fleet: str | None = None, *, hostfile: str | None = None, nproc: int | None = None,
          max_restarts: int = 0, hang_timeout: float = 60.0, all_logs: bool = False, quiet: bool = False) -> TrainResult:
    """Train as `deepfleet train` does (this machine alone, or every host of `fleet`), and wait for the end.
    Bad input, found before launch or by the ranks, raises DeepfleetError; other endings are in exit_code."""
    from deepfleet.contract import EXIT_BAD_INPUT
    from deepfleet.fleet.sources import resolve_fleet
    from deepfleet.launch.training import run_training
    from deepfleet.prepare import prepare_training, with_prepared_data

    prepared = prepare_training(recipe, resolve_fleet(fleet_file=fleet, hostfile=hostfile), nproc=nproc)
    write = (lambda line: None) if quiet else print

    def run() -> float:
        return run_training(with_prepared_data(prepared, write), max_restarts=max_restarts, hang_timeout=hang_timeout,
                            all_logs=all_logs,
                            write=write)

    try:
        seconds, code = _outside_event_loop(run), 0
    except DeepfleetError as exc:
        if exc.exit_code == EXIT_BAD_INPUT:
            raise
        seconds, code = 0.0, exc.exit_code
    return TrainResult(exit_code=code, run_dir=prepared.recipe.output_path.resolve(), seconds=seconds)


def export(run_dir: str | Path, to: str | Path, *, step: int | None = None, merge: bool = False) -> Path:
    """A complete checkpoint of `run_dir` (newest, or `step`) as one HF model dir at `to`."""
    from deepfleet.train.export import export_checkpoint

    return export_checkpoint(Path(run_dir), to=Path(to), step=step, merge=merge)


def _outside_event_loop(function):
    """Run `function` here, or in a thread when this thread already runs an event loop (Jupyter),
    where the supervisor's own `asyncio.run` cannot start."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return function()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:   # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="deepfleet-train")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
