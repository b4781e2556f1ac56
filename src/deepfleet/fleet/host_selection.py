"""`--include` / `--exclude`, as DeepSpeed's launcher reads them: `gpu1:0,1@gpu2` names hosts (by name
or address) and, after a colon, GPU indices on that host. Hosts are chosen before anything contacts
them (an excluded host may be down); GPU indices become each host's CUDA_VISIBLE_DEVICES and rank
count once its GPU count is known."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from deepfleet.errors import DeepfleetError, Problem, did_you_mean
from deepfleet.fleet.inventory import Fleet, Host

GpuChoice = dict[str, "tuple[int, ...] | None"]   # host -> GPU indices, None: the whole host


@dataclass(frozen=True, kw_only=True)
class HostSelection:
    include: GpuChoice | None = None     # None: every host of the fleet
    exclude: GpuChoice | None = None

    @classmethod
    def parse(cls, include: str | None, exclude: str | None) -> "HostSelection":
        if include and exclude:
            raise DeepfleetError("both --include and --exclude given", where="command line",
                                 fix="use one of them, as DeepSpeed's launcher does")
        return cls(include=parse_gpu_choice(include, "--include") if include else None,
                   exclude=parse_gpu_choice(exclude, "--exclude") if exclude else None)


def parse_gpu_choice(text: str, option: str) -> GpuChoice:
    """`gpu1:0,1@gpu2` -> {"gpu1": (0, 1), "gpu2": None}."""
    chosen: GpuChoice = {}
    for part in text.split("@"):
        match = re.fullmatch(r"\s*([^:\s]+)\s*(?::\s*(\d+(?:\s*,\s*\d+)*)\s*)?", part)
        if not match or match.group(1) in chosen:
            raise DeepfleetError(f"cannot read {part.strip()!r} in {text!r}", where=option,
                                 fix="write host names joined by @, each with optional GPU indices: gpu1:0,1@gpu2")
        indices = match.group(2)
        chosen[match.group(1)] = tuple(sorted({int(i) for i in indices.split(",")})) if indices else None
    return chosen


def _find(fleet: Fleet, name: str, option: str) -> Host:
    for host in fleet.hosts:
        if name in (host.name, host.address) or (host.local and name == "localhost"):
            return host
    names = [h.name for h in fleet.hosts]
    raise DeepfleetError(f"no host {name!r} in {fleet.source}{did_you_mean(name, names)}", where=option,
                         fix=f"use one of: {', '.join(names)}")


def select_hosts(fleet: Fleet, selection: HostSelection) -> Fleet:
    """The hosts the job runs on, in fleet order, each with its GPU indices (Host.gpus / Host.skip_gpus)."""
    if selection.include is not None:
        chosen = {_find(fleet, name, "--include").name: gpus for name, gpus in selection.include.items()}
        hosts = tuple(replace(h, gpus=chosen[h.name]) for h in fleet.hosts if h.name in chosen)
    else:
        excluded = {_find(fleet, name, "--exclude").name: gpus for name, gpus in (selection.exclude or {}).items()}
        hosts = tuple(replace(h, skip_gpus=excluded.get(h.name) or ()) for h in fleet.hosts
                      if h.name not in excluded or excluded[h.name] is not None)
    if not hosts:
        raise DeepfleetError("--exclude leaves no host", where="--exclude", fix="exclude fewer hosts")
    return replace(fleet, hosts=hosts)


def gpu_indices(host: Host, gpu_count: int) -> tuple[tuple[int, ...] | None, Problem | None]:
    """The GPUs `host` runs on (None: all, no CUDA_VISIBLE_DEVICES needed), or the problem with its choice."""
    if host.gpus is None and not host.skip_gpus:
        return None, None
    wanted = host.gpus if host.gpus is not None else tuple(range(gpu_count))
    missing = [i for i in (*wanted, *host.skip_gpus) if i >= gpu_count]
    if missing:
        return None, Problem(what=f"GPU {missing[0]} chosen on host {host.name}, which has {gpu_count} GPU(s)",
                             where="--include" if host.gpus is not None else "--exclude",
                             fix=f"use GPU indices 0 to {gpu_count - 1}" if gpu_count else "this host has no GPU")
    indices = tuple(i for i in wanted if i not in host.skip_gpus)
    if not indices:
        return None, Problem(what=f"no GPU left on host {host.name}", where="--exclude",
                             fix=f"exclude the whole host: --exclude {host.name}")
    return indices, None
