"""Checks run in the launching process before any rank starts, so bad input costs seconds, not a launch.

Nothing here writes anything: a failed check leaves `output_dir` exactly as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.plan.deepspeed_config import deepspeed_config_for_run, planning_steps
from deepfleet.plan.recipe import Recipe
from deepfleet.train.checkpoint_layout import check_resumable, complete_checkpoints, run_fingerprint
from deepfleet.train.model_facts import check_method_supported, check_model_source, model_facts
from deepfleet.train.tracker_checks import tracker_problems

BUILTIN_PREFIX = "builtin:"


def data_problems(recipe: Recipe) -> list[Problem]:
    """Every data path that does not exist or cannot be read (content is checked by the ranks)."""
    problems: list[Problem] = []
    sources = [("data.train", name) for name in recipe.data.train]
    sources += [("data.validation.files", name) for name in recipe.data.validation.files]
    for key, name in sources:
        if name.startswith(BUILTIN_PREFIX):
            continue
        path = Path(name).expanduser()
        if not path.exists():
            problems.append(Problem(what=f"data file {name!r} does not exist", where=key,
                                    fix="check the path (relative paths are from the current directory)"))
        elif not os.access(path, os.R_OK):
            problems.append(Problem(what=f"data file {name!r} is not readable", where=key,
                                    fix=f"chmod +r {name}"))
    return problems


def model_family_problems(recipe: Recipe) -> list[Problem]:
    """The model's family must be one deepfleet trains correctly, with this recipe's packing and LoRA
    targets. Local dirs and the built-in model are checked here; Hub ids when the ranks load them."""
    name = recipe.model.name
    if not name.startswith(BUILTIN_PREFIX) and not (Path(name).expanduser() / "config.json").is_file():
        return []
    try:
        model_facts(recipe)
    except DeepfleetError as exc:
        return exc.problems
    return []


def checkpoint_bytes(*, total_params: int, trainable_params: int, precision_bytes: int) -> int:
    """One checkpoint: the weights, plus fp32 master weights and Adam's two moments of the trainable ones."""
    return total_params * precision_bytes + trainable_params * 12


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir_problems(output_dir: Path, *, needed_bytes: int | None) -> list[Problem]:
    """output_dir must be creatable and writable, with room for one checkpoint when checkpoints are on."""
    path = output_dir.expanduser().resolve()
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return [Problem(what=f"output_dir {str(output_dir)!r} cannot be created: {existing} is a file",
                        where="output_dir", fix="choose an output_dir under a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem(what=f"output_dir {str(output_dir)!r} is not writable ({existing})", where="output_dir",
                        fix="choose a writable output_dir or fix the permissions")]
    free = shutil.disk_usage(existing).free
    if needed_bytes is not None and free < needed_bytes:
        return [Problem(what=f"{free / 2**30:.1f} GiB free at {existing}, one checkpoint needs about "
                             f"{needed_bytes / 2**30:.1f} GiB", where="output_dir",
                        fix="free disk space, choose another output_dir, or turn checkpoints off")]
    return []


def resume_problems(recipe: Recipe, *, world_size: int) -> list[Problem]:
    """A resume that would silently change the run, caught before launch (the ranks check again)."""
    newest = complete_checkpoints(recipe.output_path)
    if not recipe.resume or not newest:
        return []
    try:
        check_resumable(newest[-1][1], run_fingerprint(recipe, world_size=world_size))
    except DeepfleetError as exc:
        return exc.problems
    return []


def check_before_launch(recipe: Recipe, *, world_size: int, accelerator: str, bf16_supported: bool,
                        cuda_available: bool, bitsandbytes_installed: bool,
                        checkpoint_size: int | None = None, rank0_host: str | None = None,
                        rank0_trackers: frozenset[str] | None = None) -> None:
    """Model source, method, batch layout / DeepSpeed settings, data paths, output dir, trackers; all problems at once.
    The hardware facts are the fleet's hosts' (not the head's, which may be a login node); `rank0_trackers`
    are the tracker libraries installed on rank 0's host `rank0_host` (None: check the head's)."""
    problems: list[Problem] = []
    for check in (lambda: check_model_source(recipe),
                  lambda: check_method_supported(recipe, cuda_available=cuda_available,
                                                 bitsandbytes_installed=bitsandbytes_installed),
                  lambda: deepspeed_config_for_run(recipe, world_size=world_size, total_steps=planning_steps(recipe),
                                                   accelerator=accelerator, bf16_supported=bf16_supported)):
        try:
            check()
        except DeepfleetError as exc:
            problems += exc.problems
    if not problems:
        problems += model_family_problems(recipe)
    problems += data_problems(recipe)
    problems += output_dir_problems(recipe.output_path, needed_bytes=checkpoint_size)
    problems += resume_problems(recipe, world_size=world_size)
    problems += tracker_problems(recipe, os.environ, installed=rank0_trackers, host=rank0_host)
    if problems:
        raise DeepfleetError(problems=problems)
