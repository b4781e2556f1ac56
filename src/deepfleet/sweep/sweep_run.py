"""A sweep from start to results: check everything (recipe, grid, every trial, hosts) before anything is
written, write or check the manifest, skip finished trials, run the rest (here, or as a SLURM job
array), then rank every trial."""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.sources import resolve_fleet
from deepfleet.launch.batch_job import BatchRequest, in_job_train_argv
from deepfleet.plan.recipe_io import load_recipe
from deepfleet.sweep.grid import Trial, build_trials, chosen_indices, parse_grid
from deepfleet.sweep.results import TrialResult, collect_results, write_results
from deepfleet.sweep.slurm_array import array_script, check_slurm_request, run_array
from deepfleet.sweep.sweep_dir import (FAILED, INTERRUPTED, SweepLayout, TrialStatus, check_or_write_manifest,
                                       hold_sweep_lock, manifest_data, read_status, resume_step, trial_action,
                                       write_status)
from deepfleet.sweep.trial_runs import TrialCommand, TrialRunner, host_groups, trial_train_args

EXIT_TRIAL_FAILED = 1


@dataclass(frozen=True, kw_only=True)
class SweepRequest:
    recipe_path: str | None
    base_overrides: tuple[str, ...] = ()
    grid: tuple[str, ...] = ()
    random_count: int | None = None
    seed: int | None = None
    parallel: int = 1
    out: str | None = None              # the sweep dir; None: <recipe output_dir>/sweep
    fleet: str | None = None
    hostfile: str | None = None
    nproc: int | None = None
    max_restarts: int = 0
    hang_timeout: float = 60.0


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    layout: SweepLayout
    trials: list[Trial]
    manifest: dict[str, Any]
    command: TrialCommand
    groups: list[tuple[str, ...]] | None   # --parallel's host groups; None: every trial on the whole fleet
    parallel: int

    def train_args(self, trial: Trial, group: int | None) -> list[str]:
        hosts = self.groups[group] if self.groups is not None and group is not None else None
        return trial_train_args(self.command, trial, output_dir=self.layout.trial_dir(trial.id).resolve(), hosts=hosts)


def plan_sweep(request: SweepRequest, *, slurm: bool) -> SweepPlan:
    """Every check before anything is written or run: the recipe, the grid, every trial against the
    recipe schema, and (here, not under SLURM) --parallel against the fleet's hosts."""
    base = load_recipe(request.recipe_path, request.base_overrides)
    axes = parse_grid(request.grid)
    if request.seed is not None and request.random_count is None:
        raise DeepfleetError("a seed without --random: it chooses the trials --random draws", where=f"--seed {request.seed}",
                             fix="add --random N, or drop --seed: a grid runs every combination")
    seed = request.seed if request.seed is not None else 0
    trials = build_trials(request.recipe_path, request.base_overrides, axes,
                          chosen_indices(axes, random_count=request.random_count, seed=seed))
    groups = None
    fleet_args: tuple[str, ...] = ()
    if not slurm:
        fleet = resolve_fleet(fleet_file=request.fleet, hostfile=request.hostfile)
        groups = host_groups(fleet, request.parallel) if request.parallel > 1 else None
        fleet_args = (("--fleet", str(Path(request.fleet).resolve())) if request.fleet else
                      ("--hostfile", str(Path(request.hostfile).resolve())) if request.hostfile else ())
    recipe_path = str(Path(request.recipe_path).resolve()) if request.recipe_path else None
    command = TrialCommand(recipe_path=recipe_path, base_overrides=request.base_overrides, fleet_args=fleet_args,
                           nproc=request.nproc, max_restarts=request.max_restarts, hang_timeout=request.hang_timeout,
                           run_name=base.logging.run_name or base.output_path.name, tags=tuple(base.logging.tags))
    layout = SweepLayout(Path(request.out) if request.out else base.output_path / "sweep")
    manifest = manifest_data(recipe_path=recipe_path, base_overrides=request.base_overrides, axes=axes,
                             random_count=request.random_count, seed=seed, base=base, trials=trials)
    return SweepPlan(layout=layout, trials=trials, manifest=manifest, command=command, groups=groups,
                     parallel=request.parallel)


def dry_run_text(plan: SweepPlan) -> str:
    lines = [f"# sweep dir {plan.layout.root}: {len(plan.trials)} trial(s), {plan.parallel} at a time"]
    for index, trial in enumerate(plan.trials):
        group = index % plan.parallel if plan.groups is not None else None
        lines.append(f"{trial.id}: {shlex.join(['deepfleet', 'train', *plan.train_args(trial, group)])}")
    return "\n".join(lines) + "\n"


def trials_to_run(plan: SweepPlan, *, retry_failed: bool, write: Callable[[str], None]) -> tuple[list[Trial], int]:
    """Write (or check) the manifest and lock the dir; the trials a (resumed) sweep still runs, each decision
    printed, and the lock's fd (kept open until the sweep ends, and passed on to every trial)."""
    resumed = check_or_write_manifest(plan.layout, plan.manifest)
    lock = hold_sweep_lock(plan.layout)
    todo = []
    for trial in plan.trials:
        status = read_status(plan.layout, trial.id)
        action = trial_action(status, final_exists=(plan.layout.trial_dir(trial.id) / "final").is_dir(),
                              retry_failed=retry_failed)
        if action == "skip":
            write(f"# {trial.id}: {status.status} before, skipped ({trial.label})"
                  + ("; --retry-failed runs it again" if status.status == FAILED else ""))
            continue
        if resumed and (step := resume_step(plan.layout, trial.id)) is not None:
            write(f"# {trial.id}: resumes from its checkpoint at step {step} ({trial.label})")
        todo.append(trial)
    write(f"# sweep dir {plan.layout.root}{' (resumed)' if resumed else ''}: {len(plan.trials)} trial(s), "
          f"{len(todo)} to run" + (f", {plan.parallel} at a time" if plan.parallel > 1 else ""))
    return todo, lock


def run_here(plan: SweepPlan, trials: Sequence[Trial], *, lock: int, write: Callable[[str], None]) -> bool:
    """Run the trials as `deepfleet train` children on this machine's fleet, each holding the sweep's `lock`
    too; True when a signal stopped them."""
    def record(trial: Trial, status: TrialStatus) -> None:
        write_status(plan.layout, trial.id, status)

    runner = TrialRunner(argv_for=lambda trial, group: plan.train_args(trial, group),
                         log_for=lambda trial: plan.layout.head_log(trial.id), record=record,
                         groups=plan.parallel if plan.groups is not None else 1, write=write, inherited_fds=(lock,))
    runner.run(trials)
    return runner.stop_requested


def slurm_script(plan: SweepPlan, trials: Sequence[Trial], request: BatchRequest) -> str:
    tasks = [(plan.layout.status_file(t.id).resolve(), in_job_train_argv(plan.train_args(t, None))) for t in trials]
    return array_script(request, job_name=f"deepfleet-sweep-{plan.layout.root.resolve().name}", workdir=str(Path.cwd()),
                        log_pattern=str(plan.layout.root.resolve() / "slurm" / "job-%A_%a.log"), tasks=tasks,
                        parallel=plan.parallel)


def run_on_slurm(plan: SweepPlan, trials: Sequence[Trial], request: BatchRequest, *, created: bool,
                 write: Callable[[str], None]) -> None:
    """Submit the job array and wait for it; when sbatch refuses it, a sweep dir this command created is
    removed again."""
    try:
        run_array(request, script=plan.layout.root / "slurm" / "sweep.sbatch",
                  text=slurm_script(plan, trials, request), write=write)
    except DeepfleetError:
        if created:
            shutil.rmtree(plan.layout.root, ignore_errors=True)
        raise


def finish(plan: SweepPlan, *, stopped: bool) -> tuple[list[TrialResult], int]:
    """Rank every trial, write results.*; the sweep's exit code: 75 when stopped (run again to resume),
    1 when a trial failed, else 0."""
    statuses = {t.id: read_status(plan.layout, t.id) for t in plan.trials}
    results = collect_results(plan.layout, plan.trials, statuses)
    write_results(plan.layout, results)
    endings = {s.status for s in statuses.values() if s is not None}
    if stopped or INTERRUPTED in endings:
        return results, EXIT_PREEMPTED
    return results, EXIT_TRIAL_FAILED if FAILED in endings or None in statuses.values() else 0
