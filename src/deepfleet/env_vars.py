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


# The password of a URL with credentials, e.g. MLFLOW_TRACKING_URI=https://user:password@host
URL_PASSWORD = re.compile(r"(?<=://)([^/:@\s]*):([^/\s]+)@")


def masked(env: Mapping[str, str]) -> dict[str, str]:
    """A copy safe to print or log: secret values replaced, and passwords inside URLs."""
    return {name: (MASK if is_secret(name) else URL_PASSWORD.sub(rf"\1:{MASK}@", value)) for name, value in env.items()}
