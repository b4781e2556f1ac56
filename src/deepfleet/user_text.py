"""User-written text (recipes, fleet.yaml, DeepSpeed configs, data files): read and decoded in one way,
YAML that refuses duplicate keys, and the line of each key, so every problem can be reported at file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import yaml

from deepfleet.errors import DeepfleetError, not_utf8, shown

KeyPath = tuple[str, ...]


def _decode(data: bytes, *, at_start: bool) -> str:
    """UTF-8; a byte-order mark at the start of a file (Windows editors write one) is dropped. The one place
    deepfleet decides how a user's text is decoded."""
    return data.decode("utf-8-sig" if at_start else "utf-8")


def _cannot_read(path: Path, what: str, exc: OSError, fix: str) -> DeepfleetError:
    return DeepfleetError(f"cannot read {what}: {exc.strerror or exc}", where=str(path), fix=fix)


def read_user_text(path: Path, what: str, *, fix: str = "check the path") -> str:
    """A user's file as text; unreadable or non-UTF-8 is one error naming the file (and the line)."""
    try:
        return _decode(path.read_bytes(), at_start=True)
    except OSError as exc:
        raise _cannot_read(path, what, exc, fix) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, what, fix="save it as UTF-8 text") from None


def user_text_lines(path: Path, what: str, *, fix: str = "check the path",
                    span: tuple[int, int, int] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a user's file, streamed for files too large to hold at once (JSONL data);
    decoded and reported like read_user_text. `span` (start byte, stop byte, first line number) reads
    only the lines from a line start up to `stop`: one chunk of a file read in parallel."""
    start, stop, first = span or (0, None, 1)
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            position = start
            for number, raw in enumerate(handle, start=first):
                if stop is not None and position >= stop:
                    return
                position += len(raw)
                try:
                    yield number, _decode(raw, at_start=number == 1)
                except UnicodeDecodeError as exc:
                    raise not_utf8(path, exc, what, fix="save it as UTF-8 text", first_line=number) from None
    except OSError as exc:
        raise _cannot_read(path, what, exc, fix) from None


def holds_no_yaml(text: str) -> bool:
    """True for text with no YAML content at all: nothing, whitespace, comments, a bare `---`.
    (A syntax error is not "no content": parsing reports it.)"""
    if not text.strip():   # whitespace with a tab in it is a YAML scanner error, but still nothing
        return True
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return False
    # A bare `---` is a document holding an empty (not written) null.
    return root is None or (isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null"
                            and root.value == "")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *defaults` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:   # an unhashable key: PyYAML reports it below
                continue
            if first is not None:
                raise DuplicateKeyError(None, None, f"duplicate key {shown(str(key))} (first on line {first})",
                                        key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a duplicate key is an error."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, in one line (a character YAML forbids comes as a two-line message without a mark)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character U+{exc.character:04X} is not allowed in YAML"
    return " ".join(str(getattr(exc, "problem", None) or exc).split())


def yaml_error(exc: yaml.YAMLError, source: str, text: str) -> DeepfleetError:
    """A YAML syntax error (or duplicate key) as one line at file:line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return DeepfleetError(f"not valid YAML: {yaml_problem(exc)}", where=f"{source}:{line}",
                              fix="remove that character or write it as an escape in a double-quoted string")
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    if isinstance(exc, DuplicateKeyError):
        return DeepfleetError(str(exc.problem), where=where, fix="keep only one of the two")
    return DeepfleetError(f"not valid YAML: {yaml_problem(exc)}", where=where,
                          fix="check indentation and quoting on that line")


def key_lines(text: str) -> dict[KeyPath, int]:
    """Map each mapping key path in a YAML document to its 1-based line number."""
    lines: dict[KeyPath, int] = {}

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (str(key_node.value),)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (str(index),)] = item.start_mark.line + 1
                walk(item, path + (str(index),))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def line_of(path: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of `path`, or of its nearest parent that has one."""
    return next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
