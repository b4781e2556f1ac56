"""Network choices and probes: the interface every host shares, the head's bandwidth sink.

`select_shared_interface` is what the launcher reuses to set NCCL_SOCKET_IFNAME and
GLOO_SOCKET_IFNAME (gloo resolves the hostname to 127.0.0.1 without it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from deepfleet.fleet.inventory import is_ip_address

Interface = Mapping[str, object]   # one probe entry: {"name", "address", "prefix", "up"}


@dataclass(frozen=True, kw_only=True)
class InterfaceChoice:
    network: str | None                      # e.g. "10.213.5.0/24"; None when no subnet is shared
    per_host: dict[str, str]                 # host name -> interface name on that network
    addresses: dict[str, str]                # host name -> its address on that network
    outside: list[str] = field(default_factory=list)   # hosts without an address in the best network
    fabric: "FabricChoice | None" = None     # InfiniBand variables every host gets; None: not decided

    @property
    def same_name_everywhere(self) -> bool:
        return len(set(self.per_host.values())) == 1

    def env(self, host: str) -> dict[str, str]:
        """NCCL_/GLOO_SOCKET_IFNAME for one host, or {} when that host has no interface chosen."""
        name = self.per_host.get(host)
        return {"NCCL_SOCKET_IFNAME": name, "GLOO_SOCKET_IFNAME": name} if name else {}


@dataclass(frozen=True, kw_only=True)
class FabricChoice:
    """NCCL's InfiniBand variables for the whole job: the same on every host, since ranks that pick IB
    and ranks that pick sockets hang in NCCL's init (NVIDIA/nccl#234)."""
    env: dict[str, str]
    note: str


def choose_fabric(devices_by_host: Mapping[str, Sequence[Mapping[str, object]]]) -> FabricChoice:
    """From each host's IB ports (`/sys/class/infiniband`): the active HCAs when every host has one,
    NCCL_IB_DISABLE=1 on every host when only some have, nothing when none has."""
    active = {host: [d for d in devices if "ACTIVE" in str(d.get("state"))] for host, devices in devices_by_host.items()}
    with_ib = sorted(host for host, ports in active.items() if ports)
    if not with_ib:
        return FabricChoice(env={}, note="no active InfiniBand port: NCCL uses TCP sockets")
    if len(with_ib) < len(active):
        without = sorted(set(active) - set(with_ib))
        return FabricChoice(env={"NCCL_IB_DISABLE": "1"},
                            note=f"InfiniBand active on {', '.join(with_ib)} but not on {', '.join(without)}: "
                                 "NCCL_IB_DISABLE=1 on every host, NCCL uses TCP sockets")
    hcas = sorted({str(d["device"]) for ports in active.values() for d in ports})
    env = {"NCCL_IB_HCA": ",".join(hcas)}
    if any(d.get("link_layer") == "Ethernet" for ports in active.values() for d in ports):
        env["NCCL_IB_GID_INDEX"] = "3"   # RoCE v2
    return FabricChoice(env=env, note="InfiniBand on every host: " + " ".join(f"{k}={v}" for k, v in env.items()))


def _networks(interfaces: Iterable[Interface]) -> dict[ipaddress.IPv4Network, tuple[str, str]]:
    found: dict[ipaddress.IPv4Network, tuple[str, str]] = {}
    for entry in interfaces:
        try:
            iface = ipaddress.IPv4Interface(f"{entry['address']}/{entry['prefix']}")
        except (KeyError, ValueError):
            continue
        if iface.ip.is_loopback or iface.ip.is_link_local or entry.get("up") is False:
            continue
        found.setdefault(iface.network, (str(entry["name"]), str(iface.ip)))
    return found


def select_shared_interface(interfaces_by_host: Mapping[str, Sequence[Interface]],
                            preferred: Mapping[str, str] | None = None,
                            fleet_addresses: Mapping[str, str] | None = None) -> InterfaceChoice:
    """The subnet the most hosts share (all, ideally), and each host's interface on it.

    A subnet where two hosts have the same address is host-local (docker0 172.17.0.1, virbr0
    192.168.122.1 on every host) and never chosen. Ties go to the subnet holding the addresses the
    fleet uses (so ssh and NCCL take the same path), then to the smaller subnet. `preferred` maps
    host -> interface forced by the fleet file; `fleet_addresses` host -> the address ssh uses.
    """
    preferred = preferred or {}
    per_host = {host: _networks(entries) for host, entries in interfaces_by_host.items()}
    addresses_in = {net: [nets[net][1] for nets in per_host.values() if net in nets]
                    for nets in per_host.values() for net in nets}
    counts = Counter({net: len(found) for net, found in addresses_in.items() if len(set(found)) == len(found)})
    if not counts:
        return InterfaceChoice(network=None, per_host={}, addresses={}, outside=sorted(per_host))
    used = [ipaddress.ip_address(a) for a in (fleet_addresses or {}).values() if is_ip_address(a)]
    best = max(counts, key=lambda net: (counts[net], sum(a in net for a in used), -net.num_addresses, str(net)))
    if counts[best] < 2 and len(per_host) > 1:
        return InterfaceChoice(network=None, per_host={}, addresses={}, outside=sorted(per_host))
    chosen, addresses, outside = {}, {}, []
    for host, nets in per_host.items():
        if best in nets:
            chosen[host] = preferred.get(host, nets[best][0])
            addresses[host] = nets[best][1]
        else:
            outside.append(host)
    return InterfaceChoice(network=str(best), per_host=chosen, addresses=addresses, outside=outside)


Route = tuple[str, str]   # (the address a name resolves to, the local address the kernel sends from)


def route_towards(address: str, port: int = 9) -> Route | None:
    """How this machine would reach `address` (no packet is sent), or None when it cannot."""
    try:
        resolved = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((resolved, port))
            return resolved, probe.getsockname()[0]
    except OSError:
        return None


def is_own_route(route: Route | None) -> bool:
    """Whether the route leads back to this machine (it would send from the very address it reaches)."""
    return route is not None and (ipaddress.ip_address(route[0]).is_loopback or route[0] == route[1])


def is_this_machine(address: str) -> bool:
    return is_own_route(route_towards(address))


def source_address_towards(address: str, port: int = 9) -> str | None:
    """The local address the kernel would use to reach `address`."""
    route = route_towards(address, port)
    return route[1] if route else None


@dataclass
class BandwidthSink:
    """TCP servers on the head that count the bytes each host sends, then reply with the count.

    A barrier makes every host send at the same moment: each host says hello when its other
    probes are done, and all get "g" once every expected host said hello or finished without
    (so one dead host cannot hold the others), or after `barrier_seconds` at the latest.
    """

    expected: set[str] = field(default_factory=set)
    read_timeout: float = 10.0            # the whole transfer, after "g"
    barrier_seconds: float = 20.0
    max_bytes: int = 512 << 20
    servers: dict[str, asyncio.base_events.Server] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, addresses: Iterable[str]) -> dict[str, int]:
        ports = {}
        for address in sorted(set(addresses)):
            server = await asyncio.start_server(self._handle, host=address, port=0)
            self.servers[address] = server
            ports[address] = server.sockets[0].getsockname()[1]
        return ports

    def host_finished(self, name: str) -> None:
        """A host's probe ended: stop waiting for it."""
        self.expected.discard(name)
        self._release_if_all_ready()

    def _release_if_all_ready(self) -> None:
        if self.expected <= self.ready:
            self.go.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        try:
            name = (await asyncio.wait_for(reader.readline(), self.read_timeout)).decode().strip()
            self.ready.add(name)
            self._release_if_all_ready()
            try:
                await asyncio.wait_for(self.go.wait(), self.barrier_seconds)
            except asyncio.TimeoutError:
                self.go.set()
            writer.write(b"g")
            await writer.drain()
            deadline = asyncio.get_running_loop().time() + self.read_timeout
            while received < self.max_bytes:
                remaining = deadline - asyncio.get_running_loop().time()
                block = await asyncio.wait_for(reader.read(1 << 20), max(0.01, remaining))
                if not block:
                    break
                received += len(block)
            writer.write(str(received).encode())
            await writer.drain()
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
            await server.wait_closed()


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def start_iperf3_servers(addresses: dict[str, str]) -> dict[str, tuple[int, subprocess.Popen]]:
    """One one-off iperf3 server per host (host -> (port, process)); {} without iperf3 here."""
    if not shutil.which("iperf3"):
        return {}
    servers = {}
    for host, address in addresses.items():
        port = free_port(address)
        process = subprocess.Popen(["iperf3", "-s", "-1", "-B", address, "-p", str(port)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        servers[host] = (port, process)
    return servers


def stop_iperf3_servers(servers: dict[str, tuple[int, subprocess.Popen]]) -> None:
    for _, process in servers.values():
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
        process.wait(timeout=5)
