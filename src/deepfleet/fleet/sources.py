"""Where the fleet comes from, in the order `resolve_fleet` tries them: an explicit fleet.yaml or
DeepSpeed hostfile, ./fleet.yaml, SLURM_JOB_NODELIST, PBS_NODEFILE, and finally the local machine.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.fleet_yaml import load_fleet_yaml
from deepfleet.fleet.host_selection import HostSelection, select_hosts
from deepfleet.fleet.inventory import (DEFAULT_MASTER_PORT, Fleet, Host, check_unique, host_name_problem,
                                       validate_host)
from deepfleet.user_text import read_user_text


def parse_hostfile(text: str, source: str) -> list[Host]:
    """A DeepSpeed hostfile, as DeepSpeed reads it: `name slots=N`, '#' comments, blank lines.

    DeepSpeed only matches the start of a line, so trailing words (e.g. an interface) are
    accepted and ignored, as DeepSpeed does.
    """
    entries: list[tuple[Host, str]] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        match = re.match(r"^(\S+)\s+slots=(-?\d+)(?:\s|$)", line)
        if not match:
            problems.append(Problem(what=f"not a hostfile line: {raw.strip()!r}", where=where,
                                    fix="write `hostname slots=N`, e.g. `gpu1 slots=8`"))
            continue
        host = Host(name=match.group(1), address=match.group(1), slots=int(match.group(2)))
        line_problems = validate_host(host, where)
        problems += line_problems
        if not line_problems:
            entries.append((host, where))
    problems += check_unique(entries)
    if not entries and not problems:
        problems.append(Problem(what="hostfile lists no hosts", where=source, fix="add lines like `gpu1 slots=8`"))
    if problems:
        raise DeepfleetError(problems=problems)
    return [host for host, _ in entries]


def expand_nodelist(nodelist: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM node list such as `gpu[01-04,07],cpu5` (zero padding kept)."""
    def fail(what: str) -> DeepfleetError:
        return DeepfleetError(f"bad node list {nodelist!r}: {what}", where=where,
                              fix="use SLURM syntax such as gpu[01-04,07],cpu5 (or `scontrol show hostnames`)")

    items, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise fail("nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise fail("']' without '['")
        elif char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    if depth != 0:
        raise fail("'[' without ']'")
    items.append(nodelist[start:])
    names: list[str] = []
    for item in items:
        if not item.strip():
            raise fail("empty entry")
        expanded = [""]
        for literal, brackets, ranges in re.findall(r"([^\[\]]*)(\[([^\]]*)\])?", item):
            choices = [literal]
            if brackets:
                choices = [literal + number for number in _expand_ranges(ranges, fail)]
            if len(names) + len(expanded) * len(choices) > MAX_NODELIST_HOSTS:
                raise fail(f"more than {MAX_NODELIST_HOSTS} hosts")
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        names += expanded
    for name in names:
        if message := host_name_problem(name):
            raise fail(message)
    seen = set()
    for name in names:
        if name in seen:
            raise fail(f"host {name!r} listed twice")
        seen.add(name)
    return names


MAX_NODELIST_HOSTS = 100_000


def _expand_ranges(ranges: str, fail) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise fail(f"{part!r} is not a number or range")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise fail(f"range {part!r} runs backwards")
        if int(high) - int(low) > 100_000:
            raise fail(f"range {part!r} is too large")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def parse_pbs_nodefile(text: str, source: str) -> list[Host]:
    """A PBS nodefile lists one line per slot; repeated names add up to that host's slots."""
    slots: dict[str, int] = {}
    first_line: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if message := host_name_problem(name):
            problems.append(Problem(what=message, where=f"{source}:{number}", fix="one host name per line"))
            continue
        slots[name] = slots.get(name, 0) + 1
        first_line.setdefault(name, f"{source}:{number}")
    if problems:
        raise DeepfleetError(problems=problems)
    if not slots:
        raise DeepfleetError("nodefile lists no hosts", where=source, fix="check PBS_NODEFILE")
    return [Host(name=name, address=name, slots=count) for name, count in slots.items()]


def slurm_master_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port per SLURM job: jobs that share a node (a sweep's array tasks, small jobs) would all
    listen on 29500 and all but one fail. Below the kernel's ephemeral ports (32768-), as SLURM sites do."""
    job_id = environ.get("SLURM_JOB_ID", "")
    return 10000 + int(job_id) % 20000 if job_id.isdigit() else DEFAULT_MASTER_PORT


def local_host(slots: int | None = None) -> Host:
    return Host(name=socket.gethostname() or "localhost", address="localhost", local=True,
                slots=slots or max(1, count_local_gpus()))


def count_local_gpus() -> int:
    return len(list(Path("/proc/driver/nvidia/gpus").glob("*"))) if Path("/proc/driver/nvidia/gpus").is_dir() else 0


def resolve_fleet(*, fleet_file: str | None = None, hostfile: str | None = None,
                  environ: Mapping[str, str] | None = None, cwd: Path | None = None,
                  include: str | None = None, exclude: str | None = None) -> Fleet:
    """The fleet from the first source that applies (see the module docstring), narrowed to the hosts
    and GPUs of `include` / without those of `exclude` (DeepSpeed's `gpu1:0,1@gpu2` form)."""
    fleet = _resolve_fleet(fleet_file=fleet_file, hostfile=hostfile, environ=environ, cwd=cwd)
    if include or exclude:
        fleet = select_hosts(fleet, HostSelection.parse(include, exclude))
    return fleet


def _resolve_fleet(*, fleet_file: str | None, hostfile: str | None, environ: Mapping[str, str] | None,
                   cwd: Path | None) -> Fleet:
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    if fleet_file and hostfile:
        raise DeepfleetError("both --fleet and --hostfile given", where="command line", fix="pass only one")
    if fleet_file:
        return load_fleet_yaml(Path(fleet_file))
    if hostfile:
        hosts = parse_hostfile(read_user_text(Path(hostfile), "hostfile"), hostfile)
        return Fleet(hosts=tuple(hosts), source=hostfile)
    if (cwd / "fleet.yaml").is_file():
        return load_fleet_yaml(cwd / "fleet.yaml")
    if environ.get("SLURM_JOB_NODELIST"):
        names = expand_nodelist(environ["SLURM_JOB_NODELIST"])
        slots = int(environ["SLURM_GPUS_ON_NODE"]) if environ.get("SLURM_GPUS_ON_NODE", "").isdigit() else 1
        return Fleet(hosts=tuple(Host(name=n, address=n, slots=max(1, slots), via_srun=True) for n in names),
                     source="SLURM_JOB_NODELIST", master_port=slurm_master_port(environ))
    if environ.get("PBS_NODEFILE"):
        path = Path(environ["PBS_NODEFILE"])
        return Fleet(hosts=tuple(parse_pbs_nodefile(read_user_text(path, "PBS nodefile"), str(path))),
                     source=str(path))
    return Fleet(hosts=(local_host(),), source="local machine")
