"""The one user-facing error type.

Anything a user can cause (a bad recipe, an unreachable host, unreadable data) raises
`DeepfleetError`. The CLI catches it once and prints one line per problem:
``error: <where>: <what> (fix: <how>)``, then exits with `exit_code` (2 for bad input).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable

from deepfleet.contract import EXIT_BAD_INPUT


@dataclass(frozen=True, kw_only=True)
class Problem:
    what: str
    where: str = ""
    fix: str = ""

    def render(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} (fix: {self.fix})" if self.fix else text


@dataclass
class DeepfleetError(Exception):
    """One or more problems a user can fix. `exit_code` is what the CLI exits with."""

    problems: list[Problem] = field(default_factory=list)
    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, what: str = "", *, where: str = "", fix: str = "",
                 problems: Iterable[Problem] = (), exit_code: int = EXIT_BAD_INPUT):
        self.problems = list(problems) or [Problem(what=what, where=where, fix=fix)]
        self.exit_code = exit_code
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"error: {p.render()}" for p in self.problems)

    def __str__(self) -> str:
        return self.render()


def not_utf8(path: object, exc: UnicodeDecodeError, what: str, fix: str, first_line: int = 1) -> DeepfleetError:
    """A text file with a byte that is not UTF-8, at path:line of that byte (`first_line`: where the decoded
    bytes started in the file)."""
    line = exc.object[:exc.start].count(b"\n") + first_line
    return DeepfleetError(f"{what} is not UTF-8 text (byte {exc.object[exc.start]:#04x})", where=f"{path}:{line}",
                          fix=fix)


def shown(text: str) -> str:
    """User text for a one-line message: as written, or quoted with escapes when it holds a line break or
    another control character (which would split the line or drive the terminal)."""
    return text if text.isprintable() else repr(text)


def exception_summary(exc: BaseException) -> str:
    """`Type: first line of the message`, for a library failure quoted inside a one-line error."""
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
