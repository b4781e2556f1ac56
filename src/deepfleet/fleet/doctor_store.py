"""The facts of the last `deepfleet doctor` per fleet, kept so that what only doctor measures (the
bandwidth between hosts) reaches the planner without retyping it as --link-gbps."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.inventory import Fleet


@dataclass(frozen=True, kw_only=True)
class StoredFacts:
    facts: list[HostFacts]      # in fleet order
    saved_at: float             # unix time doctor finished


def store_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepfleet" / "doctor"


def fleet_key(fleet: Fleet) -> str:
    """The same hosts (names, addresses, users, ports) give the same key, wherever the fleet file lives."""
    hosts = sorted(f"{h.name} {h.user or ''}@{h.address}:{h.port or ''}" for h in fleet.hosts)
    return hashlib.sha256("\n".join(hosts).encode()).hexdigest()[:16]


def save_doctor_facts(fleet: Fleet, records: Sequence[dict[str, Any]]) -> Path:
    """Write atomically (a reader never sees half a file) into a directory only this user can read."""
    directory = store_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{fleet_key(fleet)}.json"
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps({"saved_at": time.time(), "records": list(records)}))
    os.replace(temporary, path)
    return path


def load_doctor_facts(fleet: Fleet) -> StoredFacts | None:
    """The stored facts of every host of `fleet`, or None (never run, unreadable, or hosts changed)."""
    try:
        stored = json.loads((store_dir() / f"{fleet_key(fleet)}.json").read_text())
        by_name = {r["host"]["name"]: HostFacts.from_record(r) for r in stored["records"]}
        return StoredFacts(facts=[by_name[h.name] for h in fleet.hosts], saved_at=float(stored["saved_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
