"""Doctor's data check: a file or dir (a model dir, a dataset) must be identical on every host.

Each host's probe summarises the path from its content manifest (`remote_probe_manifest.py`); hosts
are compared by one digest, and a host that differs is told which files, against the majority.
"""

from __future__ import annotations

from typing import Any

from deepfleet.errors import Problem
from deepfleet.fleet.findings import FLEET, Collected, Finding, differs

NAMED_FILES = 3   # files named in a finding; the rest are counted


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:NAMED_FILES])
    return shown + (f" and {len(paths) - NAMED_FILES} more" if len(paths) > NAMED_FILES else "")


def describe_difference(reference: dict[str, Any], other: dict[str, Any]) -> str:
    """What differs on `other` compared with `reference` (two probe summaries of one path)."""
    if not other.get("exists"):
        return "missing"
    mine, theirs = other.get("files", {}), reference.get("files", {})
    changed = sorted(p for p in theirs if p in mine and mine[p] != theirs[p])
    missing = sorted(p for p in theirs if p not in mine)
    extra = sorted(p for p in mine if p not in theirs)
    links = sorted(p for p in {*reference.get("links", {}), *other.get("links", {})}
                   if reference.get("links", {}).get(p) != other.get("links", {}).get(p))
    parts = [f"{len(found)} {what}: {_names(found)}" for what, found in
             (("differ", changed), ("missing", missing), ("extra", extra), ("links differ", links)) if found]
    return "; ".join(parts) or "differs"


def check_checksums(c: Collected) -> list[Finding]:
    found = []
    for path in c.checksum_paths:
        summaries = {f.host.name: f.get("checksums", path, default={}) or {} for f in c.reachable}
        found += [Finding(check="data", host=h, severity="fail", message=f"cannot checksum {path}: {s['error']}",
                          fix="make it readable there, or raise the checksum limit")
                  for h, s in summaries.items() if s.get("error")]
        digests = {h: s.get("digest") for h, s in summaries.items() if not s.get("error")}
        if (diff := differs(digests)):
            reference_host = next(h for h, d in digests.items() if d == diff[0])
            reference = summaries[reference_host]
            found += [Finding(check="data", host=h, severity="fail",
                              message=f"{path} differs from {reference_host}'s: "
                                      f"{describe_difference(reference, summaries[h])}",
                              fix=f"`deepfleet sync {path}` from a host that has it right") for h in diff[1]]
        elif digests and None in digests.values():
            found.append(Finding(check="data", host=FLEET, severity="fail", message=f"{path} missing everywhere",
                                 fix="check the path"))
        elif digests:
            summary = next(iter(summaries.values()))
            count = len(summary.get("files", {}))
            found.append(Finding(check="data", host=FLEET, severity="ok",
                                 message=f"{path} identical on all hosts ({count} file(s), {summary.get('bytes', 0):,} bytes)"))
    return found


def identity_problems(head: dict[str, dict[str, Any]], held: dict[str, dict[str, dict[str, Any]]],
                      fix: str) -> list[Problem]:
    """Each host whose copy of a path differs from the head's (`head`: path -> the head's own summary;
    `held`: host -> path -> that host's), one line naming the host, the path and the files."""
    problems = []
    for path, mine in head.items():
        for host, summaries in held.items():
            theirs = summaries.get(path) or {"exists": False}
            if theirs.get("error"):
                problems.append(Problem(where=f"{host}:{path}", what=f"cannot compare with the head's: {theirs['error']}",
                                        fix="make it readable there"))
            elif theirs.get("digest") != mine.get("digest"):
                problems.append(Problem(where=f"{host}:{path}",
                                        what=f"differs from the head's copy: {describe_difference(mine, theirs)}",
                                        fix=fix.format(path=path)))
    return problems
