"""What doctor collected and what it concluded: the types every check reads and returns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.network import InterfaceChoice, select_shared_interface
from deepfleet.fleet.ssh import SshOptions

Severity = Literal["ok", "warn", "fail"]
FLEET = "(fleet)"


@dataclass(frozen=True, kw_only=True)
class Finding:
    check: str
    host: str
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True, kw_only=True)
class Collected:
    fleet: Fleet
    facts: list[HostFacts]
    listener: dict[str, Any] | None = None        # the master port listener's report
    matrix: bool = True                           # whether host->host ssh was probed
    checksum_paths: tuple[str, ...] = ()
    ssh_options: SshOptions = field(default_factory=SshOptions)
    head_hosts: frozenset[str] = frozenset()      # fleet hosts that are the machine doctor ran on

    @property
    def reachable(self) -> list[HostFacts]:
        return [f for f in self.facts if f.ok]

    @property
    def interfaces_unknown(self) -> list[str]:
        """Hosts whose probe could not list addresses (no iproute2 `ip -j`)."""
        return [f.host.name for f in self.reachable if f.get("interfaces") is None]

    def interface_choice(self) -> InterfaceChoice:
        preferred = {h.name: h.interface for h in self.fleet.hosts if h.interface}
        known = {f.host.name: f.get("interfaces") for f in self.reachable if f.get("interfaces") is not None}
        return select_shared_interface(known, preferred, {h.name: h.address for h in self.fleet.hosts})


def differs(values: dict[str, Any]) -> tuple[Any, list[str]] | None:
    """(majority value, hosts that differ from it), or None when all agree."""
    counts = Counter(values.values())
    if len(counts) <= 1:
        return None
    majority = counts.most_common(1)[0][0]
    return majority, sorted(h for h, v in values.items() if v != majority)
