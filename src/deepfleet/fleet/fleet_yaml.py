"""fleet.yaml: the typed schema and its loader, with file:line and did-you-mean for every problem.

```yaml
defaults:            # applied to every host unless the host says otherwise
  user: ubuntu
  slots: 8
python: /opt/venv/bin/python      # same absolute path on every host (default: this interpreter)
master_port: 29500
infiniband: auto                  # NCCL_IB_HCA when every host has an active IB port, NCCL_IB_DISABLE=1
                                  # when only some have; off: set no NCCL_IB_* variable
output_dir: /shared/runs
ssh: {config_file: ~/.ssh/config, identity_file: ~/.ssh/id_ed25519, connect_timeout: 5}
hosts:
  - gpu1                          # shorthand: address only
  - {address: 10.0.0.12, name: gpu2, slots: 4, interface: ens5, env: {NCCL_DEBUG: INFO}}
```
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepfleet.errors import DeepfleetError, Problem, did_you_mean, shown
from deepfleet.fleet.inventory import DEFAULT_MASTER_PORT, Fleet, Host, SshSettings, check_unique, validate_host
from deepfleet.user_text import KeyPath, key_lines, line_of, load_yaml, read_user_text, yaml_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostDefaults(_Section):
    user: Optional[str] = None
    port: Optional[int] = None
    slots: Optional[int] = None      # None: one rank per GPU the host has (1 on a CPU host)
    interface: Optional[str] = None
    python: Optional[str] = None
    env: dict[str, str] = {}


class HostEntry(_Section):
    address: str
    name: Optional[str] = None
    user: Optional[str] = None
    port: Optional[int] = None
    slots: Optional[int] = None
    interface: Optional[str] = None
    python: Optional[str] = None
    env: dict[str, str] = {}


class SshSection(_Section):
    config_file: Optional[str] = None
    identity_file: Optional[str] = None
    known_hosts_file: Optional[str] = None
    connect_timeout: float = Field(5.0, gt=0, le=120)


class FleetFile(_Section):
    hosts: list[HostEntry] = Field(min_length=1)
    defaults: HostDefaults = HostDefaults()
    python: Optional[str] = None
    master_port: int = Field(DEFAULT_MASTER_PORT, gt=0, lt=65536)
    infiniband: Literal["auto", "off"] = "auto"   # off: deepfleet sets no NCCL_IB_* variables
    workdir: Optional[str] = None
    output_dir: Optional[str] = None
    ssh: SshSection = SshSection()

    @field_validator("infiniband", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("hosts", mode="before")
    @classmethod
    def _address_shorthand(cls, value: Any) -> Any:
        """`- gpu1` means `- {address: gpu1}`."""
        if isinstance(value, list):
            return [{"address": item} if isinstance(item, (str, int)) and not isinstance(item, bool) else item
                    for item in value]
        return value


_SECTIONS: dict[KeyPath, type[BaseModel]] = {(): FleetFile, ("defaults",): HostDefaults, ("ssh",): SshSection}


def _problem(error: dict, source: str, lines: dict[KeyPath, int]) -> Problem:
    loc = tuple(str(p) for p in error["loc"])
    line = line_of(loc, lines)
    where = f"{source}:{line}" if line else source
    key_path = shown(".".join(loc)) or "(top level)"
    if error["type"] == "extra_forbidden":
        section = HostEntry if loc[:1] == ("hosts",) else _SECTIONS.get(loc[:-1], FleetFile)
        allowed = list(section.model_fields)
        return Problem(what=f"unknown key {key_path}{did_you_mean(loc[-1], allowed)}", where=where,
                       fix=f"remove it or use one of: {', '.join(allowed)}")
    return Problem(what=f"{key_path}: {error['msg'].removeprefix('Value error, ')}", where=where,
                   fix="see the example at the top of deepfleet/fleet/fleet_yaml.py")


def _host_from(entry: HostEntry, defaults: HostDefaults) -> Host:
    env = {**defaults.env, **entry.env}
    return Host(name=entry.name or entry.address, address=entry.address,
                user=entry.user if entry.user is not None else defaults.user,
                port=entry.port if entry.port is not None else defaults.port,
                slots=entry.slots if entry.slots is not None else defaults.slots,
                interface=entry.interface or defaults.interface,
                python=entry.python or defaults.python,
                env=tuple(sorted(env.items())))


def parse_fleet_yaml(text: str, source: str) -> Fleet:
    try:
        data = load_yaml(text) if text.strip() else None
        lines = key_lines(text)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source, text) from None
    if not isinstance(data, dict):
        raise DeepfleetError("a fleet file must be a mapping with a hosts: list", where=source,
                             fix="start with `hosts:` followed by `- hostname` lines")
    try:
        parsed = FleetFile.model_validate(data)
    except ValidationError as exc:
        raise DeepfleetError(problems=[_problem(e, source, lines) for e in exc.errors()]) from None
    entries: list[tuple[Host, str]] = []
    problems: list[Problem] = []
    for index, entry in enumerate(parsed.hosts):
        host = _host_from(entry, parsed.defaults)
        where = f"{source}:{lines.get(('hosts', str(index)), '?')}"
        found = validate_host(host, where)
        problems += found
        if not found:
            entries.append((host, where))
    problems += check_unique(entries)
    if problems:
        raise DeepfleetError(problems=problems)
    ssh = parsed.ssh
    return Fleet(hosts=tuple(h for h, _ in entries), source=source,
                 python=parsed.python or sys.executable, master_port=parsed.master_port, infiniband=parsed.infiniband,
                 workdir=parsed.workdir, output_dir=parsed.output_dir,
                 ssh=SshSettings(config_file=_expand(ssh.config_file), identity_file=_expand(ssh.identity_file),
                                 known_hosts_file=_expand(ssh.known_hosts_file),
                                 connect_timeout=ssh.connect_timeout))


def _expand(path: Optional[str]) -> Optional[str]:
    return str(Path(path).expanduser()) if path else None


def load_fleet_yaml(path: Path) -> Fleet:
    return parse_fleet_yaml(read_user_text(path, "fleet file"), str(path))


def render_fleet_yaml(fleet: Fleet) -> str:
    """The fleet as fleet.yaml text (what `deepfleet hosts --yaml` prints)."""
    hosts: list[Any] = []
    for host in fleet.hosts:
        entry: dict[str, Any] = {"address": host.address}
        if host.name != host.address:
            entry["name"] = host.name
        for key in ("user", "port", "interface", "python"):
            if getattr(host, key) is not None:
                entry[key] = getattr(host, key)
        if host.slots is not None:
            entry["slots"] = host.slots
        if host.env:
            entry["env"] = dict(host.env)
        hosts.append(entry)
    return yaml.safe_dump({"hosts": hosts, "master_port": fleet.master_port}, sort_keys=False)
