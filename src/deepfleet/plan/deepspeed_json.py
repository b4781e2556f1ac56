"""Reading a user's DeepSpeed JSON exactly as DeepSpeed does: with hjson, refusing a key given twice.

DeepSpeed loads a config file with `hjson.load(f, object_pairs_hook=dict_raise_error_on_duplicate_keys)`
(deepspeed/runtime/config.py), so comments (`//`, `#`, `/* */`) and trailing commas are fine there, and a
duplicate key is an error. This is the one parser for every DeepSpeed JSON deepfleet reads from a user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hjson
from hjson.decoder import JSONObject, make_scanner

from deepfleet.errors import DeepfleetError, exception_summary
from deepfleet.user_text import read_user_text


class DuplicateDeepSpeedKey(ValueError):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


def _line_at(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _object_refusing_duplicates(state, encoding, strict, scan_once, object_hook, object_pairs_hook, memo=None,
                                objectWithoutBraces=False):
    """hjson's own JSONObject, told where each value starts, so a duplicate key is reported at its line.
    (hjson's object_pairs_hook, which DeepSpeed uses, sees the pairs but not where they are.)"""
    text = state[0]
    value_starts: list[int] = []

    def scan_value(string: str, index: int) -> Any:
        value_starts.append(index)   # JSONObject scans each value once, in order, right after its key
        return scan_once(string, index)

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        first_lines: dict[str, int] = {}
        for (key, _), start in zip(pairs, value_starts):
            line = _line_at(text, start)
            if key in first_lines:
                raise DuplicateDeepSpeedKey(key, line, first_lines[key])
            first_lines[key] = line
        return dict(pairs)

    return JSONObject(state, encoding, strict, scan_value, object_hook, refuse_duplicates, memo,
                      objectWithoutBraces)


class _DeepSpeedDecoder(hjson.HjsonDecoder):
    def __init__(self) -> None:
        super().__init__()
        self.parse_object = _object_refusing_duplicates
        self.scan_once, self.scan_object_once = make_scanner(self)


def read_deepspeed_json(path: str | Path) -> str:
    """The text of a user's DeepSpeed JSON (the one file read outside the recipe, at the edge)."""
    return read_user_text(Path(path).expanduser(), "DeepSpeed config",
                          fix="check deepspeed.config in the recipe (relative paths are from the current directory)")


def parse_deepspeed_json(text: str, source: str) -> dict[str, Any]:
    """The config as DeepSpeed would load it; a syntax error or a duplicate key is one error at file:line."""
    try:
        data = _DeepSpeedDecoder().decode(text)
    except DuplicateDeepSpeedKey as dup:
        raise DeepfleetError(f'duplicate key "{dup.key}" (first on line {dup.first_line}); DeepSpeed refuses it',
                             where=f"{source}:{dup.line}", fix="keep only one of the two") from None
    except hjson.HjsonDecodeError as exc:
        raise DeepfleetError(f"not valid JSON: {exc.msg}", where=f"{source}:{exc.lineno}:{exc.colno}",
                             fix="check commas, quotes and brackets on that line") from None
    except IndexError:   # hjson reads past the end of a text cut short inside a /* comment
        raise DeepfleetError("not valid JSON: the text ends inside a comment, string or bracket",
                             where=f"{source}:{_line_at(text, len(text))}",
                             fix="close the /* comment, string or bracket that is still open") from None
    except (ValueError, OverflowError, RecursionError) as exc:   # e.g. 1e999: hjson's int() of infinity
        raise DeepfleetError(f"not valid JSON: {exception_summary(exc)}", where=source,
                             fix="check the numbers and nesting in the file") from None
    if not isinstance(data, dict):
        raise DeepfleetError("a DeepSpeed config must be a JSON object", where=source,
                             fix='start with { "train_micro_batch_size_per_gpu": ... }')
    return data
