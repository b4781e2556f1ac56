"""The hosts' facts for launch and planning: asked over ssh (one probe round trip), or read from a
`deepfleet doctor --record` file; and `deepfleet hostfile --discover`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.facts import HostFacts, probe_hosts
from deepfleet.fleet.host_hardware import default_slots, hardware_from_facts
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.ssh import SshOptions
from deepfleet.user_text import read_user_text


def unreachable_problems(facts: list[HostFacts]) -> list[Problem]:
    problems = []
    for f in facts:
        if f.failure:
            problems.append(Problem(what=f"cannot reach {f.host.destination}: {f.failure.what}",
                                    where=f"host {f.host.name}", fix=f.failure.fix))
        elif f.error:
            problems.append(Problem(what=f.error, where=f"host {f.host.name}", fix="check python3 on that host"))
    return problems


def probe_fleet(fleet: Fleet, ssh_options: SshOptions, *, timeout: float = 30.0,
                checksum_paths: tuple[str, ...] = ()) -> list[HostFacts]:
    """Every host's facts (no network tests), in fleet order; unreachable hosts are one error.
    `checksum_paths`: also summarise these files and dirs by content (hashing what no stored manifest covers)."""
    params = {"network_seconds": 0, "checksum": list(checksum_paths), "checksum_limit": None}   # the caller's timeout bounds it
    facts = asyncio.run(probe_hosts(fleet.hosts, python_for=fleet.python_for, params_for=lambda h: params,
                                    options=ssh_options, timeout=timeout))
    if problems := unreachable_problems(facts):
        raise DeepfleetError(problems=problems)
    return facts


def read_facts_record(path: str, fleet: Fleet) -> list[HostFacts]:
    """The facts `deepfleet doctor --record PATH` saved, for this fleet's hosts in fleet order (the host
    settings are the fleet's current ones; the record supplies what was found there)."""
    try:
        records = json.loads(read_user_text(Path(path), "facts record"))
        by_name = {r["host"]["name"]: HostFacts.from_record(r) for r in records}
    except (ValueError, TypeError, KeyError) as exc:
        raise DeepfleetError(f"not a `deepfleet doctor --record` file ({exc})", where=path,
                             fix="write it with: deepfleet doctor --record FILE") from None
    missing = [h.name for h in fleet.hosts if h.name not in by_name or not by_name[h.name].ok]
    if missing:
        raise DeepfleetError(f"no facts for host(s) {', '.join(missing)} of {fleet.source}", where=path,
                             fix=f"run `deepfleet doctor --record {path}` on this fleet again")
    return [replace(by_name[h.name], host=h) for h in fleet.hosts]


def discover_hosts(fleet: Fleet, ssh_options: SshOptions, *, timeout: float = 30.0) -> list[Host]:
    """GPU hosts get one slot per GPU; CPU hosts keep their configured slots (or 1)."""
    hosts = []
    for f in probe_fleet(fleet, ssh_options, timeout=timeout):
        hardware = hardware_from_facts(f)
        keep = f.host.slots if f.host.slots is not None and not hardware.gpu_count else None
        hosts.append(replace(f.host, slots=keep or default_slots(hardware)))
    return hosts
