"""`deepfleet doctor`: one parallel probe per host (plus a master-port listener), then the checks.

Everything a host needs to answer travels in one ssh round trip, and all hosts run at once, so
the wall time stays near one host's even for many hosts.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deepfleet.fleet.checks import run_checks
from deepfleet.fleet.findings import Collected, Finding
from deepfleet.fleet.facts import HostFacts, probe_hosts
from deepfleet.fleet.inventory import Fleet, Host, is_ip_address
from deepfleet.fleet.network import (BandwidthSink, Route, is_own_route, route_towards, start_iperf3_servers,
                                     stop_iperf3_servers)
from deepfleet.fleet.ssh import SshOptions, ssh_argv


@dataclass(frozen=True, kw_only=True)
class DoctorOptions:
    workdir: str = field(default_factory=os.getcwd)
    output_dir: str | None = None
    checksum_paths: tuple[str, ...] = ()
    matrix: bool = True                  # host->host ssh for every ordered pair
    network: bool = True                 # master port and bandwidth probes
    bandwidth_seconds: float = 0.5       # built-in test; iperf3 (when both sides have it) runs 1 s
    iperf3: bool = True
    network_seconds: float = 5.0         # master port connect deadline on each host
    hop_timeout: float = 8.0


@dataclass(frozen=True, kw_only=True)
class DoctorReport:
    collected: Collected
    findings: list[Finding]
    seconds: float

    @property
    def failed(self) -> bool:
        return any(f.severity == "fail" for f in self.findings)

    def to_json(self) -> str:
        return json.dumps({"seconds": round(self.seconds, 3), "failed": self.failed,
                           "findings": [vars(f) for f in self.findings]}, indent=2)

    def record(self) -> list[dict[str, Any]]:
        return [f.to_record() for f in self.collected.facts]


HOP_PARALLEL = 8   # ssh tests one host runs at once


def network_phase_seconds(options: DoctorOptions, host_count: int) -> float:
    """Upper bound of a host's hops + master connect phase (hops run in waves of HOP_PARALLEL)."""
    waves = -(-(host_count - 1) // HOP_PARALLEL) if options.matrix else 0
    return max(options.hop_timeout * max(1, waves), options.network_seconds) + 2


def hop_argv(peer: Host, options: SshOptions) -> list[str]:
    """What a host runs to test ssh to a peer: no multiplexing, strict host keys, just `true`."""
    return ssh_argv(peer, ["true"], options=replace(options, control_dir=None, host_key_policy="yes",
                                                    reachability_only=True))


def probe_params(fleet: Fleet, host: Host, options: DoctorOptions, ssh_options: SshOptions, *,
                 share_token: tuple[str, str] | None, bandwidth: dict[str, tuple[str, int, int | None]],
                 ) -> dict[str, Any]:
    params: dict[str, Any] = {
        "python": fleet.python_for(host), "workdir": fleet.workdir or options.workdir,
        "output_dir": options.output_dir or fleet.output_dir, "checksum": list(options.checksum_paths),
        "share_token": list(share_token) if share_token else None,
        "network_seconds": options.network_seconds, "hop_timeout": options.hop_timeout, "hop_parallel": HOP_PARALLEL,
        "bandwidth_seconds": options.bandwidth_seconds,
    }
    if options.matrix and len(fleet.hosts) > 1:
        # Each host starts with the next host in the fleet, so the hosts' first connections go to
        # different targets: sshd drops unauthenticated connections beyond MaxStartups (10).
        index = fleet.hosts.index(host)
        peers = [*fleet.hosts[index + 1:], *fleet.hosts[:index]]
        params["hops"] = {peer.name: hop_argv(peer, ssh_options) for peer in peers}
    if options.network and len(fleet.hosts) > 1:
        params["master"] = [fleet.master.address, fleet.master_port]
        if host == fleet.master:
            params["listen"] = {"port": fleet.master_port, "expect": len(fleet.hosts),
                                "seconds": network_phase_seconds(options, len(fleet.hosts)) + 1}
            if is_ip_address(fleet.master.address):   # listen where the hosts connect, as the rendezvous will
                params["listen"]["address"] = fleet.master.address
    if options.network and host.name in bandwidth:
        address, port, iperf3_port = bandwidth[host.name]
        params["bandwidth"] = [address, port, host.name, iperf3_port]
    return params


def write_share_token(output_dir: str | None) -> tuple[Path, tuple[str, str]] | None:
    """Write a random token in the head's output dir; hosts that see it share that dir."""
    if not output_dir or not Path(output_dir).is_dir():
        return None
    name, value = f".deepfleet-share-{secrets.token_hex(6)}", secrets.token_hex(16)
    path = Path(output_dir) / name
    try:
        path.write_text(value)
    except OSError:
        return None
    return path, (name, value)


async def head_routes(fleet: Fleet, *, timeout: float) -> dict[str, Route | None]:
    """How the head reaches each host (name lookups run at once, bounded in time)."""
    lookups = [asyncio.wait_for(asyncio.to_thread(route_towards, h.address), timeout) for h in fleet.hosts]
    found = await asyncio.gather(*lookups, return_exceptions=True)
    return {h.name: (r if isinstance(r, tuple) else None) for h, r in zip(fleet.hosts, found)}


async def collect(fleet: Fleet, options: DoctorOptions, ssh_options: SshOptions) -> Collected:
    output_dir = options.output_dir or fleet.output_dir
    routes = await head_routes(fleet, timeout=ssh_options.connect_timeout)
    # The fleet hosts that are the machine doctor runs on (usually node 0, listed by its address).
    head_hosts = frozenset(h.name for h in fleet.hosts if h.local or is_own_route(routes[h.name]))
    token = write_share_token(output_dir)
    phase = network_phase_seconds(options, len(fleet.hosts))
    barrier = ssh_options.connect_timeout + phase + 5                  # first host ready -> last host ready
    sink = BandwidthSink(barrier_seconds=barrier)
    iperf3: dict = {}
    try:
        bandwidth: dict[str, tuple[str, int, int | None]] = {}
        if options.network:
            reachable = {h.name: routes[h.name][1] for h in fleet.hosts if not h.local and routes[h.name]}
            ports = await sink.start(reachable.values())
            iperf3 = start_iperf3_servers(reachable) if options.iperf3 else {}
            bandwidth = {name: (addr, ports[addr], iperf3.get(name, (None,))[0]) for name, addr in reachable.items()}
            sink.expected = set(bandwidth)
        timeout = ssh_options.connect_timeout + 5 + phase + barrier + 2 + options.bandwidth_seconds + 5
        facts = await probe_hosts(
            fleet.hosts, python_for=fleet.python_for, options=ssh_options, timeout=timeout,
            params_for=lambda h: probe_params(fleet, h, options, ssh_options,
                                              share_token=token[1] if token else None, bandwidth=bandwidth)
            | {"bandwidth_go_timeout": barrier + 2},
            on_done=lambda result: sink.host_finished(result.host.name))
        master_facts = next(f for f in facts if f.host == fleet.master)
        listened = master_facts.get("listener") if master_facts.ok else None
    finally:
        await sink.close()
        stop_iperf3_servers(iperf3)
        if token:
            token[0].unlink(missing_ok=True)
    return Collected(fleet=fleet, facts=facts, listener=listened, matrix=options.matrix,
                     checksum_paths=options.checksum_paths, ssh_options=ssh_options, head_hosts=head_hosts)


def run_doctor(fleet: Fleet, options: DoctorOptions, ssh_options: SshOptions) -> DoctorReport:
    started = time.monotonic()
    collected = asyncio.run(collect(fleet, options, ssh_options))
    return DoctorReport(collected=collected, findings=run_checks(collected), seconds=time.monotonic() - started)


def report_from_record(fleet: Fleet, records: list[dict[str, Any]], listener: dict[str, Any] | None = None) -> list[Finding]:
    """Re-run the checks on recorded facts (used by tests and `doctor --replay`)."""
    facts = [HostFacts.from_record(r) for r in records]
    return run_checks(Collected(fleet=fleet, facts=facts, listener=listener))
