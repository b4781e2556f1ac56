"""Session fixture `family_models`: one tiny random-weight model dir per model family (see family_models.py).

Built once per session and cached on disk between sessions (under $DEEPFLEET_TEST_CACHE or
~/.cache/deepfleet-tests, in a dir named by a hash of the builder sources and library versions).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # pytest's prepend import mode adds it too
    sys.path.insert(0, str(Path(__file__).parent))

from family_models import FamilyModel, build_all, cache_root  # noqa: E402


@pytest.fixture(scope="session")
def family_models() -> dict[str, FamilyModel]:
    return build_all(cache_root())
