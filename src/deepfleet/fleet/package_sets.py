"""Which Python distributions must match the head's on every host, and how they differ (pure).

The set is the head's installed `deepfleet` plus the transitive requirement closure of it: the
distributions its rank code (and what that imports: torch, deepspeed, transformers...) can load
on a host. Requirements are followed as installed metadata states them (markers evaluated for
the head, extras a requirement asks for followed). Of deepfleet's own extras, an extra counts
when everything it requires is installed on the head (`qlora` with bitsandbytes), because then
the head's runs use it; tool extras (dev, test, docs) never count, ranks do not import them.
A user's own training code may need more: `--package NAME` adds that distribution and its
closure. Not the whole `pip freeze`: a head's notebook tools have no business on GPU hosts.

Versions compare by PEP 440 (`1.0` == `1.0.0`), names by PEP 503 (`Foo_Bar` == `foo-bar`).
A local version label is part of the version: torch `2.13.0+cpu` and `2.13.0+cu124` differ,
and the difference is named as a CUDA build difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

ROOT_DISTRIBUTION = "deepfleet"
TOOL_EXTRAS = frozenset({"dev", "test", "tests", "testing", "docs", "doc", "lint", "typing"})


def canonical_name(name: str) -> str:
    """PEP 503 normalised name: runs of -, _ and . become one -, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, kw_only=True)
class Dist:
    """One installed distribution: its name as its metadata spells it, and its version."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return canonical_name(self.name)

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True, kw_only=True)
class InstalledDist:
    """What the closure needs to know about an installed distribution (from importlib.metadata)."""

    name: str
    version: str
    requires: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()       # Provides-Extra


PackageSet = dict[str, Dist]           # canonical name -> the head's distribution
Lookup = Callable[[str], "InstalledDist | None"]


def _wanted(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in (*extras, ""))


def _installed_extras(dist: InstalledDist, lookup: Lookup) -> list[str]:
    """The root's extras whose every requirement is installed (so the head's runs use them)."""
    chosen = []
    for extra in dist.extras:
        if extra in TOOL_EXTRAS:
            continue
        needed = [r for r in _requirements(dist) if r.marker is not None and r.marker.evaluate({"extra": extra})
                  and not r.marker.evaluate({"extra": ""})]
        if needed and all(lookup(r.name) is not None for r in needed):
            chosen.append(extra)
    return chosen


def _requirements(dist: InstalledDist) -> list[Requirement]:
    found = []
    for text in dist.requires:
        try:
            found.append(Requirement(text))
        except InvalidRequirement:
            continue    # a broken requirement line of some third-party metadata: not ours to fail on
    return found


def requirement_closure(roots: Iterable[str], lookup: Lookup) -> tuple[PackageSet, list[str]]:
    """The installed closure of `roots` -> (set, required names that are not installed on the head)."""
    found: PackageSet = {}
    missing: list[str] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...], bool]] = [(name, (), True) for name in roots]
    while todo:
        name, extras, is_root = todo.pop()
        dist = lookup(name)
        if dist is None:
            if canonical_name(name) not in map(canonical_name, missing):
                missing.append(name)
            continue
        key = canonical_name(dist.name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        found[key] = Dist(name=dist.name, version=dist.version)
        if is_root:
            extras = (*extras, *_installed_extras(dist, lookup))
        for requirement in _requirements(dist):
            if _wanted(requirement, extras):
                todo.append((requirement.name, tuple(sorted(requirement.extras)), False))
    return dict(sorted(found.items())), missing


def same_version(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def local_label(version: str | None) -> str | None:
    """`cu124` of `2.13.0+cu124`; None without a label."""
    return version.partition("+")[2] or None if version else None


@dataclass(frozen=True, kw_only=True)
class Difference:
    host: str
    dist: Dist                  # the head's
    found: str | None           # the host's version; None: not installed there

    @property
    def note(self) -> str:
        if self.found is None:
            return "not installed"
        head, here = self.dist.version, self.found
        if self.dist.key == "torch" and head.partition("+")[0] == here.partition("+")[0]:
            return f"CUDA build: +{local_label(here) or 'default'} here, +{local_label(head) or 'default'} on the head"
        return "different version"


def compare(host: str, head: PackageSet, host_versions: Mapping[str, str | None]) -> list[Difference]:
    """Every head distribution this host lacks or has at another version (keys: canonical names)."""
    found = {canonical_name(name): version for name, version in host_versions.items()}
    return [Difference(host=host, dist=dist, found=found.get(key)) for key, dist in head.items()
            if not same_version(dist.version, found.get(key))]


def cpu_torch_over_gpu_torch(difference: Difference) -> bool:
    """Installing the head's `+cpu` torch would replace a host's GPU build: never done silently."""
    return (difference.dist.key == "torch" and difference.found is not None
            and local_label(difference.dist.version) == "cpu" and local_label(difference.found) != "cpu")
