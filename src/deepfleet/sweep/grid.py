"""The trials of a sweep (pure): `--grid key=v1,v2` axes, their combinations (all, or `--random N`
distinct ones drawn with `--seed`), each checked against the recipe schema before any trial runs,
each with an id derived from its values as the recipe reads them (`1e-4` and `0.0001` are one trial).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deepfleet.errors import DeepfleetError, Problem, shown
from deepfleet.plan.recipe import Recipe
from deepfleet.plan.recipe_io import load_recipe, unknown_key_problem

GRID_FIX = "write it like --grid train.lr=1e-4,2e-4"
SET_BY_SWEEP = ("output_dir",)     # each trial's output_dir is its dir under the sweep dir


@dataclass(frozen=True)
class GridAxis:
    key: str                       # "train.lr"
    values: tuple[str, ...]        # as written: "1e-4"


@dataclass(frozen=True)
class Trial:
    id: str                        # "trial-" + 8 hex digits of the values below
    overrides: tuple[str, ...]     # "train.lr=1e-4", as written, passed to `deepfleet train`
    values: dict[str, Any]         # key -> the value as the recipe reads it (JSON)

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


def split_values(text: str) -> list[str]:
    """`1e-4,2e-4` -> ["1e-4", "2e-4"]; commas inside [..], {..} or quotes belong to the value
    (`lora.target_modules=[q_proj,v_proj],all-linear` has two values)."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_grid(specs: Sequence[str]) -> list[GridAxis]:
    """Every `--grid KEY=V1,V2,...` as an axis; a malformed one, a key swept twice, a key not in the
    recipe schema, or no grid at all is one error."""
    if not specs:
        raise DeepfleetError("no --grid given: a sweep needs at least one key to vary", where="--grid",
                             fix="add --grid KEY=V1,V2,..., e.g. --grid train.lr=1e-4,2e-4")
    axes: dict[str, GridAxis] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        where = f"--grid {shown(spec)}"
        if not sep or not key:
            raise DeepfleetError(f"{shown(spec)!s} is not KEY=V1,V2,...", where="--grid", fix=GRID_FIX)
        values = split_values(raw) if raw.strip() else []
        if not values:
            raise DeepfleetError(f"no values for {key}: the grid would be empty", where=where, fix=GRID_FIX)
        if "" in values:
            raise DeepfleetError(f"an empty value in {shown(raw)}", where=where,
                                 fix="remove the extra comma, or quote an empty string as ''")
        if key in axes:
            raise DeepfleetError(f"{key} is swept by two --grid options", where=where,
                                 fix=f"give all its values in one: --grid {key}=A,B,C")
        if key in SET_BY_SWEEP:
            raise DeepfleetError(f"{key} is set by the sweep: each trial trains into its own dir", where=where,
                                 fix="drop it; --out chooses the sweep dir")
        if (problem := unknown_key_problem(tuple(key.split(".")), where=where)) is not None:
            raise DeepfleetError(problems=[problem])
        axes[key] = GridAxis(key=key, values=tuple(values))
    return list(axes.values())


def combination_count(axes: Sequence[GridAxis]) -> int:
    return math.prod(len(axis.values) for axis in axes)


def combination(axes: Sequence[GridAxis], index: int) -> tuple[str, ...]:
    """The `index`-th combination in itertools.product order (the last axis varies fastest), as overrides;
    computed from the index, so a sample of a huge grid never lists the whole grid."""
    picked = []
    for axis in reversed(axes):
        index, position = divmod(index, len(axis.values))
        picked.append(f"{axis.key}={axis.values[position]}")
    return tuple(reversed(picked))


def chosen_indices(axes: Sequence[GridAxis], *, random_count: int | None, seed: int) -> list[int]:
    """Every combination in grid order, or `random_count` distinct ones drawn with `seed` (the same seed
    draws the same trials, in the same order)."""
    total = combination_count(axes)
    if random_count is None:
        return list(range(total))
    if random_count > total:
        raise DeepfleetError(f"{random_count} trials asked for, the grid has {total} combination(s)",
                             where=f"--random {random_count}",
                             fix=f"--random {total} or less, or drop --random to run every combination")
    return random.Random(seed).sample(range(total), random_count)


def value_at(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def trial_id(values: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"trial-{digest[:8]}"


def override_item(problem: Problem) -> str:
    """The override a recipe problem is about: its `where` is `command line (train.lr=-1)`."""
    return problem.where.removeprefix("command line (").removesuffix(")") if problem.where else ""


def _failures(recipe_path: str | Path | None, overrides: Sequence[str], failures: dict[str, None]) -> Recipe | None:
    """The recipe with `overrides`, or None with its problems added to `failures`."""
    try:
        return load_recipe(recipe_path, overrides)
    except DeepfleetError as exc:
        for problem in exc.problems:
            failures.setdefault(f"{override_item(problem)}: {problem.what}", None)
        return None


def build_trials(recipe_path: str | Path | None, base_overrides: Sequence[str], axes: Sequence[GridAxis],
                 indices: Sequence[int]) -> list[Trial]:
    """The trials, each checked against the recipe schema, and every grid value on its own (also those
    --random did not draw); every value that fails is listed in one error."""
    trials, failures, seen = [], {}, {}
    for axis in axes:
        for value in axis.values:
            _failures(recipe_path, [*base_overrides, f"{axis.key}={value}"], failures)
    for index in indices:
        overrides = combination(axes, index)
        recipe = _failures(recipe_path, [*base_overrides, *overrides], failures)
        if recipe is None:
            continue
        dumped = recipe.model_dump(mode="json")
        values = {axis.key: value_at(dumped, axis.key) for axis in axes}
        trial = Trial(id=trial_id(values), overrides=overrides, values=values)
        if trial.id in seen:
            raise DeepfleetError(f"{trial.label} and {seen[trial.id]} are the same trial (the recipe reads "
                                 f"both as {json.dumps(values)})", where="--grid",
                                 fix="give each value once")
        seen[trial.id] = trial.label
        trials.append(trial)
    if failures:
        raise DeepfleetError(f"{len(failures)} grid value(s) fail the recipe schema: {'; '.join(failures)}",
                             where="--grid", fix="change or drop those values; every trial is checked before any runs")
    return trials
