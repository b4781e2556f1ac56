"""Recipe loading: YAML text + `key=value` overrides -> a validated `Recipe`, or every problem at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from deepfleet.errors import DeepfleetError, Problem, did_you_mean, shown
from deepfleet.plan.recipe import SECTION_SHORTHANDS, Recipe
from deepfleet.user_text import (KeyPath, holds_no_yaml, key_lines, line_of, load_yaml, read_user_text, yaml_error,
                                 yaml_problem)

def override_where(item: str) -> str:
    return f"command line ({shown(item)})"


def _override_parts(item: str) -> tuple[KeyPath, str]:
    """`a.b=value` -> (("a", "b"), "value")."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise DeepfleetError(f"override {item!r} is not key=value", where="command line",
                             fix="write it like train.lr=1e-4")
    return tuple(key.strip().split(".")), raw


def _override_value(item: str, raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return load_yaml(raw)
    except yaml.YAMLError as exc:
        raise DeepfleetError(f"value is not valid YAML: {yaml_problem(exc)}",
                             where=override_where(item), fix="quote the value or fix its YAML") from None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        parts, raw = _override_parts(item)
        expand = SECTION_SHORTHANDS.get(parts[0])
        if expand and len(parts) > 1 and parts[0] in result:   # `model: NAME` + model.revision=...
            result[parts[0]] = expand(result[parts[0]])
        target = result
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {} if target.get(part) is None else target[part]
            if not isinstance(target[part], dict):
                raise DeepfleetError(f"{part} is not a section", where=override_where(item),
                                     fix="override a key inside a section, e.g. train.lr=1e-4")
            target = target[part]
        target[parts[-1]] = _override_value(item, raw)
    return result


def _fields_at(model: type[BaseModel], path: KeyPath) -> list[str]:
    """The field names of the sub-model reached by `path`, for did-you-mean suggestions."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def unknown_key_problem(path: KeyPath, *, where: str) -> Problem | None:
    """The first part of `path` that no recipe section has, with a did-you-mean; None when every part is
    known as far as sections go (below a mapping such as env:, or a value, the schema decides)."""
    for depth, part in enumerate(path):
        fields = _fields_at(Recipe, path[:depth])
        if not fields:
            return None
        if part not in fields:
            return Problem(what=f"unknown key {shown('.'.join(path[:depth + 1]))}{did_you_mean(part, fields)}",
                           where=where, fix=f"use one of: {', '.join(fields)}")
    return None


def _override_of(loc: KeyPath, overridden: dict[KeyPath, str], lines: dict[KeyPath, int]) -> str | None:
    """The override that set the value at `loc`, or created the key `loc` that the file does not have."""
    for path, item in reversed(overridden.items()):
        if loc and (loc[:len(path)] == path or (path[:len(loc)] == loc and loc not in lines)):
            return item
    return None


def _where(loc: KeyPath, source: str, lines: dict[KeyPath, int], overridden: dict[KeyPath, str]) -> str:
    item = _override_of(loc, overridden, lines)
    if item is not None:
        return override_where(item)
    line = line_of(loc, lines)
    return f"{source}:{line}" if line else source


# The tags pydantic adds to loc: union members and validators ("function-before[...]", "list[str]") and "[key]".
_PYDANTIC_TAG = re.compile(r"[a-z][\w-]*\[.*\]|\[key\]")


def _user_path(error: dict) -> KeyPath:
    """The key path in the user's recipe: pydantic's loc without its type tags. An unknown key, always last,
    is kept as written (a key such as "[" or "a[b]" is the user's, not a tag)."""
    loc = tuple(str(part) for part in error["loc"])
    unknown_key = loc[-1:] if error["type"] == "extra_forbidden" else ()
    return tuple(part for part in loc[:len(loc) - len(unknown_key)] if not _PYDANTIC_TAG.fullmatch(part)) + unknown_key


def _problem(error: dict, source: str, lines: dict[KeyPath, int], overridden: dict[KeyPath, str]) -> Problem:
    loc = _user_path(error)
    key_path = shown(".".join(loc)) or "(top level)"
    where = _where(loc, source, lines, overridden)
    if error["type"] == "extra_forbidden":
        hint = did_you_mean(loc[-1], _fields_at(Recipe, loc[:-1]))
        allowed = ", ".join(_fields_at(Recipe, loc[:-1]))
        return Problem(what=f"unknown key {key_path}{hint}", where=where,
                       fix=f"remove it or use one of: {allowed}")
    message = error["msg"].removeprefix("Value error, ")
    return Problem(what=f"{key_path}: {message}", where=where,
                   fix="see the commented example in examples/ for allowed values")


def parse_recipe(text: str, source: str = "<recipe>", overrides: Iterable[str] = ()) -> Recipe:
    try:
        data = load_yaml(text) if text.strip() else {}
        lines = key_lines(text)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source, text) from None
    if not isinstance(data, dict):
        raise DeepfleetError("a recipe must be a YAML mapping of sections", where=source,
                             fix="start with keys such as model:, data:, train:")
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    overridden = {_override_parts(item)[0]: item for item in overrides}
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e, source, lines, overridden) for e in exc.errors()]
        raise DeepfleetError(problems=problems) from None


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe file (or use the built-in defaults when `path` is None)."""
    if path is None:
        return parse_recipe("", "<defaults>", overrides)
    path = Path(path)
    text = read_user_text(path, "recipe", fix="check the path, or run without a recipe for the built-in demo")
    if holds_no_yaml(text):   # an empty file must not quietly train with every default
        raise DeepfleetError("recipe is empty", where=str(path),
                             fix="add the sections you need (model:, data:, train:; see examples/), or check "
                                 "that this is the file you meant")
    return parse_recipe(text, str(path), overrides)
