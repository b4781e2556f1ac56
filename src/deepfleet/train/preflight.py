"""Checks run in the launching process before any rank starts, so bad input costs seconds, not a launch.

Nothing here writes anything: a failed check leaves `output_dir` exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.plan.deepspeed_config import deepspeed_config_for_run
from deepfleet.plan.recipe import Recipe
from deepfleet.train.model import check_method_supported, check_model_source

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


def check_before_launch(recipe: Recipe, *, world_size: int, accelerator: str, cuda_available: bool) -> None:
    """Model source, method, batch layout / DeepSpeed settings and data paths; all problems at once."""
    problems: list[Problem] = []
    for check in (lambda: check_model_source(recipe),
                  lambda: check_method_supported(recipe, cuda_available=cuda_available),
                  lambda: deepspeed_config_for_run(recipe, world_size=world_size, total_steps=100,
                                                   accelerator=accelerator, bf16_supported=cuda_available)):
        try:
            check()
        except DeepfleetError as exc:
            problems += exc.problems
    problems += data_problems(recipe)
    if problems:
        raise DeepfleetError(problems=problems)
