"""Helpers the cluster tests import by name (a module named `conftest` would be ambiguous:
tests/families has one too)."""

from __future__ import annotations

import os

import pytest

FAKE_DEEPSPEED_VERSION = "0.14.0"


def skip_or_fail(reason: str) -> None:
    """Skip with the reason; under CI=true a missing prerequisite is a failure instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cluster prerequisite missing under CI=true: {reason}")
    pytest.skip(f"namespace cluster unavailable: {reason}")
