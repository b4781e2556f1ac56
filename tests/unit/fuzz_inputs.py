"""Hypothesis strategies for hard user input: structured mutations of a valid document (dropped, duplicated
and unknown keys, wrong types, huge numbers, unicode, control characters) and text damage (truncation,
stray characters). Shared by the test_fuzz_* files."""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import yaml
from hypothesis import strategies as st

from deepfleet.errors import DeepfleetError

WEIRD_STRINGS = ["", " ", "\x00", "\x1b[31m", "\u202e", "é", "😀", "\ud7ff", "a\nb", "-rf", "$(reboot)", "~",
                 "../..", "x" * 300, "1e999", "nan", "inf", "0x10", "null", "true", "[", "{", ":", "#", "\t"]
WEIRD_VALUES: list[Any] = [None, True, False, 0, -1, 2**63, -(2**63), 10**30, 1e308, -0.0, 0.5, [], {}, [1, "a"],
                           {"a": 1}, *WEIRD_STRINGS]

weird_value = st.one_of(st.sampled_from(WEIRD_VALUES), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=12))
weird_key = st.one_of(st.sampled_from(WEIRD_STRINGS), st.text(max_size=8))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a document."""
    found: list[tuple] = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found += _paths(child, prefix + (key,))
    return found


def _parent(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated(draw: Callable, valid: Any, *, max_mutations: int = 3) -> Any:
    """`valid` with a few structured mutations: drop, replace with a weird value, add a weird key."""
    doc = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        action = draw(st.sampled_from(["drop", "replace", "add_key", "wrap"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(weird_value))   # WEIRD_VALUES' lists and dicts are shared
        elif action == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        elif isinstance(parent, dict):
            parent[draw(weird_key)] = copy.deepcopy(draw(weird_value))
    return doc


def damaged(draw: Callable, text: str) -> str:
    """`text` cut short, or with a stray character, or a line repeated (a duplicated key), or unchanged."""
    action = draw(st.sampled_from(["keep", "truncate", "insert", "repeat_line"]))
    if action == "keep" or not text:
        return text
    index = draw(st.integers(0, len(text)))
    if action == "truncate":
        return text[:index]
    if action == "insert":
        return text[:index] + draw(st.sampled_from(WEIRD_STRINGS + ["\r", "\x0c", "\ufeff", '"', "'", "}", "]"])) + \
            text[index:]
    lines = text.splitlines(keepends=True)
    line = draw(st.integers(0, len(lines) - 1))
    return "".join(lines[:line + 1] + [lines[line]] + lines[line + 1:])


@st.composite
def yaml_text(draw: Callable, valid: dict) -> str:
    return damaged(draw, yaml.safe_dump(draw(mutated(valid)), sort_keys=False, allow_unicode=True))


@st.composite
def json_text(draw: Callable, valid: Any) -> str:
    return damaged(draw, json.dumps(draw(mutated(valid)), ensure_ascii=draw(st.booleans()), indent=1))


def outcome(parse: Callable[[], Any]) -> str:
    """'ok' or the one-line error of a parser; anything but DeepfleetError propagates and fails the test."""
    try:
        parse()
    except DeepfleetError as exc:
        assert exc.exit_code == 2 and exc.problems
        for problem in exc.problems:
            line = problem.render()
            assert line.isprintable() and "Traceback" not in line, line   # one line, no terminal escapes
        return "error"
    return "ok"
