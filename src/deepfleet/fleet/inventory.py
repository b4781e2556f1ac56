"""The fleet: typed hosts and their validation (where a fleet comes from: `sources.py`).

Every name and user is validated here, so nothing unchecked ever reaches a remote shell.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field, replace

from deepfleet import env_vars
from deepfleet.errors import DeepfleetError, Problem

DEFAULT_MASTER_PORT = 29500
# Hostnames (RFC 1123 labels, plus "_" seen in the wild), IPv4 and bracket-free IPv6 literals.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
MAX_SLOTS = 1024   # ranks on one host; far above any real machine, catches a typo
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


@dataclass(frozen=True, kw_only=True)
class Host:
    """One machine of the fleet. `name` is what users see; `address` is what ssh connects to."""

    name: str
    address: str
    user: str | None = None          # None: ssh's own default (~/.ssh/config, then $USER)
    port: int | None = None          # None: ssh's own default
    slots: int | None = None         # ranks to start here; None: one per GPU found there (1 on a CPU host)
    interface: str | None = None     # NCCL/GLOO socket interface override
    python: str | None = None        # interpreter on this host; None: the fleet's
    env: tuple[tuple[str, str], ...] = ()
    local: bool = False              # the machine deepfleet runs on: no ssh needed
    via_srun: bool = False           # a node of the SLURM allocation deepfleet runs in: reached as a job step, not ssh
    gpus: tuple[int, ...] | None = None   # GPU indices chosen with --include; None: all
    skip_gpus: tuple[int, ...] = ()       # GPU indices left out with --exclude

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


@dataclass(frozen=True, kw_only=True)
class SshSettings:
    """Where ssh finds its config, key and known_hosts; None means ssh's own defaults."""

    config_file: str | None = None
    identity_file: str | None = None
    known_hosts_file: str | None = None
    connect_timeout: float = 5.0


@dataclass(frozen=True, kw_only=True)
class Fleet:
    hosts: tuple[Host, ...]
    source: str                                  # where the fleet came from, for messages
    python: str = field(default_factory=lambda: sys.executable)
    master_port: int = DEFAULT_MASTER_PORT
    workdir: str | None = None                   # None: the current directory of the head
    output_dir: str | None = None
    ssh: SshSettings = field(default_factory=SshSettings)
    infiniband: str = "auto"                     # "auto": NCCL's IB variables from the hosts' ports; "off": none

    @property
    def master(self) -> Host:
        return self.hosts[0]

    def python_for(self, host: Host) -> str:
        return host.python or self.python

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if name in (host.name, host.address):
                return host
        raise DeepfleetError(f"no host {name!r} in the fleet", where=self.source,
                             fix=f"use one of: {', '.join(h.name for h in self.hosts)}")


def host_name_problem(name: str) -> str | None:
    """Why `name` is not a safe host name or address, or None when it is."""
    if not name:
        return "empty host name"
    if name.startswith("-"):
        return f"host {name!r} starts with '-' (ssh would read it as an option)"
    if _HOSTNAME.match(name) or (":" in name and _IPV6.match(name) and is_ip_address(name.split("%")[0])):
        return None
    if len(name) > 253:
        return f"host name of {len(name)} characters is longer than 253"
    if re.fullmatch(r"[A-Za-z0-9_.-]+:\d+", name):
        return f"host {name!r}: the port does not go in the host name (use the port setting, e.g. --port)"
    bad = sorted({c for c in name if not ((c.isascii() and c.isalnum()) or c in "._-:")})
    if not bad:
        return f"host {name!r} is not a host name or IP address"
    return f"host {name!r} contains characters not allowed in a host name: {''.join(bad)!r}"


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def user_problem(user: str) -> str | None:
    return None if _USER.match(user) else f"user {user!r} is not a valid login name"


def validate_host(host: Host, where: str) -> list[Problem]:
    """Every problem with one host entry; `where` is the file:line or key path for messages."""
    problems: list[Problem] = []
    for value in (host.address, host.name):
        message = host_name_problem(value)
        if message:
            problems.append(Problem(what=message, where=where,
                                    fix="use a plain host name or IP address (letters, digits, '.', '-', '_')"))
            break
    if host.user is not None and (message := user_problem(host.user)):
        problems.append(Problem(what=message, where=where, fix="use the login name, e.g. user: ubuntu"))
    if host.slots is not None and not 1 <= host.slots <= MAX_SLOTS:
        problems.append(Problem(what=f"slots={host.slots} for host {host.name!r}", where=where,
                                fix=f"slots is the number of ranks on that host: 1 to {MAX_SLOTS} "
                                    "(remove the host to skip it)"))
    if host.port is not None and not 0 < host.port < 65536:
        problems.append(Problem(what=f"port {host.port} out of range", where=where, fix="use 1-65535"))
    if host.interface is not None and not _IFNAME.match(host.interface):
        problems.append(Problem(what=f"interface {host.interface!r} is not an interface name", where=where,
                                fix="use a name from `ip -br addr`, e.g. eth0"))
    for name, _ in host.env:
        if not env_vars.NAME.match(name):
            problems.append(Problem(what=f"env name {name!r} is not a valid variable name", where=where,
                                    fix="use letters, digits and '_'"))
    return problems


def check_unique(hosts: list[tuple[Host, str]]) -> list[Problem]:
    """Duplicate host addresses (with their user and port) are an error: one rank set per host."""
    seen: dict[tuple[str, int | None, str | None], str] = {}
    names: dict[str, str] = {}
    problems = []
    for host, where in hosts:
        key = (host.address.lower(), host.port, host.user)
        if key in seen:
            problems.append(Problem(what=f"host {host.address!r} listed twice (first at {seen[key]})", where=where,
                                    fix="list each host once and put its rank count in slots"))
        elif host.name.lower() in names:   # logs, heartbeats and messages are per name
            problems.append(Problem(what=f"host name {host.name!r} used twice (first at {names[host.name.lower()]})",
                                    where=where, fix="give every host its own name"))
        else:
            seen[key] = where
            names[host.name.lower()] = where
    return problems


def with_hosts(fleet: Fleet, hosts: list[Host]) -> Fleet:
    return replace(fleet, hosts=tuple(hosts))


def hosts_from_names(names: str, *, user: str | None = None, port: int | None = None) -> list[Host]:
    """`--hosts a,b,c` (each optionally user@host) as hosts, validated."""
    if port is not None and not 0 < port < 65536:
        raise DeepfleetError(f"port {port} out of range", where="--port", fix="use 1-65535")
    hosts, problems = [], []
    for item in [n.strip() for n in names.split(",") if n.strip()]:
        item_user, _, address = item.rpartition("@")
        host = Host(name=address, address=address, user=item_user or user, port=port)
        found = validate_host(host, "--hosts")
        problems += found
        if not found:
            hosts.append((host, "--hosts"))
    problems += check_unique(hosts)
    if not hosts and not problems:
        problems.append(Problem(what="no hosts given", where="--hosts", fix="e.g. --hosts gpu1,gpu2"))
    if problems:
        raise DeepfleetError(problems=problems)
    return [host for host, _ in hosts]


def render_hostfile(hosts: list[Host] | tuple[Host, ...]) -> str:
    """A DeepSpeed hostfile for these hosts (addresses, since DeepSpeed ssh's to them)."""
    return "".join(f"{host.address} slots={host.slots}\n" for host in hosts)
