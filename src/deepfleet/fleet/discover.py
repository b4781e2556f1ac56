"""`deepfleet hostfile --discover`: ask every host how many accelerators it has."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.facts import HostFacts, probe_hosts
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.ssh import SshOptions


def slots_from_facts(facts: HostFacts) -> Host:
    """GPU hosts get one slot per GPU; CPU hosts keep their configured slots."""
    gpus = facts.get("accelerators", "count", default=0) or 0
    return replace(facts.host, slots=gpus) if gpus else facts.host


def unreachable_problems(facts: list[HostFacts]) -> list[Problem]:
    problems = []
    for f in facts:
        if f.failure:
            problems.append(Problem(what=f"cannot reach {f.host.destination}: {f.failure.what}",
                                    where=f"host {f.host.name}", fix=f.failure.fix))
        elif f.error:
            problems.append(Problem(what=f.error, where=f"host {f.host.name}", fix="check python3 on that host"))
    return problems


def discover_hosts(fleet: Fleet, ssh_options: SshOptions, *, timeout: float = 30.0) -> list[Host]:
    params = {"network_seconds": 0}
    facts = asyncio.run(probe_hosts(fleet.hosts, python_for=fleet.python_for, params_for=lambda h: params,
                                    options=ssh_options, timeout=timeout))
    problems = unreachable_problems(facts)
    if problems:
        raise DeepfleetError(problems=problems)
    return [slots_from_facts(f) for f in facts]
