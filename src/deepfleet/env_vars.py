"""Environment variable names: which are valid, which hold secrets, and copies of environments safe
to print, log or record (pure)."""

from __future__ import annotations

import re
from typing import Mapping

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MASK = "****"


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def masked(env: Mapping[str, str]) -> dict[str, str]:
    """A copy safe to print or log: secret values replaced."""
    return {name: (MASK if is_secret(name) else value) for name, value in env.items()}
