"""Record formats: detect which one a source uses and turn each record into a conversation or a text.

messages: {"messages": [{"role", "content"}, ...]}
alpaca:   {"instruction", "input" (optional), "output", "system" (optional)}
sharegpt: {"conversations": [{"from", "value"}, ...]}
text:     {"text"}
"""

from __future__ import annotations

from typing import Any, Iterable

from deepfleet.errors import DeepfleetError, Problem, did_you_mean, shown
from deepfleet.train.data_sources import SourceRecord, capped_problems

Conversation = list[dict[str, str]]

FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
CHAT_FORMATS = ("messages", "alpaca", "sharegpt")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
}


class RecordShapeError(ValueError):
    """A record does not have the shape its format needs; the message says what is wrong."""


def _expected(fmt: str) -> str:
    return "{" + ", ".join(f'"{key}"' for key in FORMAT_KEYS[fmt]) + "}"


def _key_list(keys: Iterable[str]) -> str:
    return ", ".join(shown(str(key)) for key in sorted(keys, key=str)) or "(none)"


def _suggestion(keys: set[str], expected: list[str]) -> str:
    """A did-you-mean for the first key that is close to an expected one."""
    for key in sorted(keys):
        hint = did_you_mean(key, expected)
        if hint:
            return hint
    return ""


def detect_format(record: SourceRecord) -> str:
    """The format whose required keys the record has; an error naming the keys seen otherwise."""
    keys = set(record.fields)
    for fmt, required in FORMAT_KEYS.items():
        if keys.issuperset(required):
            return fmt
    seen = _key_list(keys)
    hint = _suggestion(keys, [key for required in FORMAT_KEYS.values() for key in required])
    expected = " or ".join(f"{fmt} {_expected(fmt)}" for fmt in FORMAT_KEYS)
    raise DeepfleetError(f"cannot tell the data format from keys {seen}{hint}", where=record.where,
                         fix=f"records need {expected}; or set data.format")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordShapeError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _turns(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordShapeError(f'"{key}" must be a non-empty list of turns')
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordShapeError(f'"{key}"[{index}] must be an object')
    return value


def _messages(fields: dict) -> Conversation:
    conversation = []
    for index, turn in enumerate(_turns(fields["messages"], "messages")):
        missing = [key for key in ("role", "content") if key not in turn]
        if missing:
            raise RecordShapeError(f'messages[{index}] has keys {sorted(turn)}, needs "role" and "content"')
        conversation.append({"role": _string(turn["role"], f"messages[{index}].role"),
                             "content": _string(turn["content"], f"messages[{index}].content")})
    return conversation


def _alpaca(fields: dict) -> Conversation:
    prompt = _string(fields["instruction"], '"instruction"')
    extra = fields.get("input") or ""
    if _string(extra, '"input"').strip():
        prompt = f"{prompt}\n\n{extra}"
    conversation = []
    if fields.get("system"):
        conversation.append({"role": "system", "content": _string(fields["system"], '"system"')})
    conversation.append({"role": "user", "content": prompt})
    conversation.append({"role": "assistant", "content": _string(fields["output"], '"output"')})
    return conversation


def _sharegpt(fields: dict) -> Conversation:
    conversation = []
    for index, turn in enumerate(_turns(fields["conversations"], "conversations")):
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            raise RecordShapeError(f'conversations[{index}] has keys {sorted(turn)}, needs "from" and "value"')
        speaker = _string(turn["from"], f"conversations[{index}].from")
        if speaker not in SHAREGPT_ROLES:
            raise RecordShapeError(f'conversations[{index}].from is {speaker!r}{did_you_mean(speaker, SHAREGPT_ROLES)}, '
                                   f"expected one of {', '.join(SHAREGPT_ROLES)}")
        conversation.append({"role": SHAREGPT_ROLES[speaker],
                             "content": _string(turn["value"], f"conversations[{index}].value")})
    return conversation


def _convert(record: SourceRecord, fmt: str) -> Conversation | str:
    missing = [key for key in FORMAT_KEYS[fmt] if key not in record.fields]
    if missing:
        seen = _key_list(record.fields)
        hint = _suggestion(set(record.fields), list(FORMAT_KEYS[fmt]))
        raise RecordShapeError(f"record has keys {seen}{hint} but {fmt} format needs {_expected(fmt)}")
    if fmt == "text":
        return _string(record.fields["text"], '"text"')
    return {"messages": _messages, "alpaca": _alpaca, "sharegpt": _sharegpt}[fmt](record.fields)


def shape_fix(fmt: str) -> str:
    return f"give every record the {fmt} shape {_expected(fmt)}, or set data.format to the format the file uses"


def converted_records(records: list[SourceRecord], fmt: str) -> tuple[list[Conversation | str], list[Problem]]:
    """Each record as a conversation (chat formats) or a string (text), and every shape problem, not raised."""
    converted: list[Conversation | str] = []
    problems: list[Problem] = []
    for record in records:
        try:
            converted.append(_convert(record, fmt))
        except RecordShapeError as exc:
            problems.append(Problem(what=str(exc), where=record.where, fix=shape_fix(fmt)))
    return converted, problems


def convert_records(records: list[SourceRecord], fmt: str) -> list[Conversation | str]:
    """Each record as a conversation (chat formats) or a string (text); all shape problems at once."""
    converted, problems = converted_records(records, fmt)
    if problems:
        raise DeepfleetError(problems=capped_problems(problems, fix=shape_fix(fmt)))
    return converted
