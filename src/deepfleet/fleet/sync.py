"""`deepfleet sync`: put files and dirs at the same path on every host, over the fleet's own ssh.

The head scans each source into a content manifest (kept beside it, so a re-sync re-reads nothing
unchanged), asks every host in one ssh round trip what it holds there (`remote_holdings.inspect_item`),
refuses before sending a byte when a host cannot take it, then streams only what is missing down a
fan-out tree (`sync_plan.py`). Every host verifies what it holds against the manifest at the end.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Sequence

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.remote_probe_manifest import refreshed_manifest
from deepfleet.fleet.remote_sync import BOOTSTRAP, CHUNK, Child, Fanout, merge_wants
from deepfleet.fleet.ssh import SshOptions, host_argv, options_for, run_on_hosts
from deepfleet.fleet.sync_plan import (HEAD, HostItemPlan, Shape, SyncItem, describe_tree, destination, fanout_shape,
                                       fanout_tree, host_item_plan, needs_anything, node_plan, space_problem)

AGENT_FILES = ("remote_probe_manifest.py", "remote_sync.py", "remote_holdings.py")
_PICK_PYTHON = 'if [ -x "$1" ]; then exec "$1" -c "$2"; else exec python3 -c "$2"; fi'
# Errors a user fixes on the host (room, permissions), as opposed to a transfer that broke.
HOST_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True, kw_only=True)
class SyncOptions:
    """How to sync; the defaults are what `deepfleet sync PATH` does."""

    to: str | None = None              # put each PATH into this dir on the hosts; None: the same path
    shape: str = "auto"                # auto | direct | chain | tree
    outside_links: str = "refuse"      # refuse | keep: a symlink leaving the tree is refused, or copied as a link
    delete: bool = False               # remove files on the hosts that the source does not have
    rehash: bool = False               # re-hash every file on the hosts instead of trusting stored manifests
    timeout: float = 3600.0            # the whole transfer
    stall_seconds: float = 120.0       # a host that takes no bytes for this long is cut loose and reported


@dataclass(frozen=True, kw_only=True)
class HostOutcome:
    host: str
    verdict: str                       # verified | unchanged | source | failed
    bytes: int = 0
    seconds: float = 0.0
    extra: int = 0
    what: str = ""
    path: str = ""
    errno: int | None = None


@dataclass(frozen=True, kw_only=True)
class SyncReport:
    items: list[SyncItem]
    shape: str                         # how the data travelled, e.g. `chain: head -> h1 -> h2`
    outcomes: list[HostOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[HostOutcome]:
        return [o for o in self.outcomes if o.verdict == "failed"]

    def error(self) -> DeepfleetError | None:
        """One line per host that failed; exit 2 when every failure is the host's to fix (room, rights)."""
        if not self.failed:
            return None
        problems = [Problem(where=f"{o.host}:{o.path}" if o.path else o.host, what=o.what,
                            fix=_fix(o)) for o in self.failed]
        refusals = all(o.errno in HOST_REFUSALS for o in self.failed)
        return DeepfleetError(problems=problems, exit_code=2 if refusals else 1)


def _fix(outcome: HostOutcome) -> str:
    if outcome.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on {outcome.host}, or sync elsewhere with --to"
    if outcome.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make it writable on {outcome.host}, or sync elsewhere with --to"
    return "run the same `deepfleet sync` again: it resumes"


def agent_code(entry: str) -> bytes:
    source = "\n".join(resources.files("deepfleet.fleet").joinpath(name).read_text() for name in AGENT_FILES)
    return (source + f"\n{entry}()\n").encode()


def agent_stdin(code: bytes, frame: dict[str, Any]) -> bytes:
    return b"%d\n" % len(code) + code + json.dumps(frame).encode() + b"\n"


def agent_argv(python: str) -> list[str]:
    return ["sh", "-c", _PICK_PYTHON, "sh", python, BOOTSTRAP]


def source_items(paths: Sequence[str], to: str | None, outside_links: str) -> list[SyncItem]:
    """Each PATH with its manifest (stored beside it); one error line per bad PATH."""
    if to is not None and not os.path.isabs(to):
        raise DeepfleetError("the destination must be an absolute path", where=f"--to {to}",
                             fix=f"use --to {os.path.abspath(to)}")
    items, problems, dests = [], [], {}
    for path in paths:
        source = os.path.abspath(path)
        dest = os.path.normpath(destination(source, to))
        if not os.path.exists(source):
            problems.append(Problem(where=f"head:{source}", what="no such file or directory", fix="check the path"))
        elif source == "/" or dest == "/":
            problems.append(Problem(where=f"head:{source}", what="refusing to sync the root directory",
                                    fix="name the dirs or files to sync"))
        elif dest in dests:
            problems.append(Problem(where=f"head:{source}", what=f"goes to {dest} on the hosts, as {dests[dest]} does",
                                    fix="sync them separately with different --to dirs"))
        else:
            dests[dest] = source
            item, outside = _scan(source, dest)
            if outside and outside_links == "refuse":
                rel, target = outside[0]
                problems.append(Problem(where=f"head:{os.path.join(source, rel)}",
                                        what=f"symlink to {target} points outside {source}",
                                        fix="--outside-links keep copies it as a link; or replace it with the file"))
            items.append(item)
    if problems:
        raise DeepfleetError(problems=problems)
    return items


def _scan(source: str, dest: str) -> tuple[SyncItem, list[tuple[str, str]]]:
    try:
        manifest = refreshed_manifest(source)
    except OSError as exc:
        raise DeepfleetError(f"cannot read: {exc.strerror or exc}", where=f"head:{exc.filename or source}",
                             fix="make it readable") from None
    root = source if manifest["kind"] == "dir" else os.path.dirname(source)
    files = {rel: {"sha256": entry["sha256"], "size": entry["size"], "mtime_ns": entry["mtime_ns"],
                   "mode": os.stat(os.path.join(root, rel) if manifest["kind"] == "dir" else source).st_mode & 0o7777}
             for rel, entry in manifest["files"].items()}
    links = {rel: link["target"] for rel, link in manifest["links"].items()}
    outside = [(rel, link["target"]) for rel, link in sorted(manifest["links"].items()) if not link["inside"]]
    return SyncItem(source=source, dest=dest, kind=manifest["kind"], files=files, links=links), outside


def inspect_timeout(items: Sequence[SyncItem]) -> float:
    """A host without a stored manifest hashes everything once: allow 50 MB/s for that."""
    return 60 + sum(item.size for item in items) / 50e6


def inspect_hosts(fleet: Fleet, hosts: Sequence[Host], targets: Sequence[dict[str, str]], *, rehash: bool,
                  options: SshOptions, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """What every host holds at each target ({dest, kind, and the source's digest when there is one}),
    in one ssh round trip per host."""
    code = agent_code("inspect_main")
    frames = {h.name: {"host": h.name, "rehash": rehash, "items": list(targets)} for h in hosts}
    results = asyncio.run(run_on_hosts(hosts, lambda h: agent_argv(fleet.python_for(h)), options=options,
                                       timeout=timeout, stdin=lambda h: agent_stdin(code, frames[h.name])))
    found, problems = {}, []
    for result in results:
        line = next((line for line in result.stdout.splitlines() if line.startswith("{")), None)
        if result.ok and line:
            found[result.host.name] = json.loads(line)["items"]
            continue
        if result.failure:
            what, fix = result.failure.what, result.failure.fix
        else:
            what = (result.stderr.strip().splitlines() or ["no answer"])[-1]
            fix = "check the fleet's python there with `deepfleet doctor`"
        problems.append(Problem(where=result.host.name, what=f"cannot inspect: {what}", fix=fix))
    if problems:
        raise DeepfleetError(problems=problems)
    return found


def host_plans(items: Sequence[SyncItem], found: dict[str, list[dict[str, Any]]], *, delete: bool
               ) -> dict[str, list[HostItemPlan]]:
    plans = {host: [host_item_plan(item, f, delete=delete) for item, f in zip(items, held)]
             for host, held in found.items()}
    problems = [Problem(where=f"{host}:{p.path}", what=p.problem, fix=f"fix it on {host}, or sync elsewhere with --to")
                for host, item_plans in plans.items() for p in item_plans if p.problem]
    for host, item_plans in plans.items():
        full = not any(p.problem for p in item_plans) and space_problem(item_plans, found[host])
        if full:
            problems.append(Problem(where=f"{host}:{full[0]}", what=full[1],
                                    fix=f"free space on {host}, or sync elsewhere with --to"))
    if problems:
        raise DeepfleetError(problems=problems)
    return plans


def run_sync(fleet: Fleet, paths: Sequence[str], options: SyncOptions = SyncOptions()) -> SyncReport:
    items = source_items(paths, options.to, options.outside_links)
    ssh = options_for(fleet)
    # The head's own copy is the source when it is also a host and the paths are the same.
    is_source = {h.name for h in fleet.hosts if h.local and all(i.dest == i.source for i in items)}
    hosts = [h for h in fleet.hosts if h.name not in is_source]
    targets = [{"dest": i.dest, "kind": i.kind, "digest": i.digest} for i in items]
    found = inspect_hosts(fleet, hosts, targets, rehash=options.rehash, options=ssh,
                          timeout=inspect_timeout(items)) if hosts else {}
    plans = host_plans(items, found, delete=options.delete)
    outcomes = {name: HostOutcome(host=name, verdict="source") for name in is_source}
    outcomes |= {name: HostOutcome(host=name, verdict="unchanged", extra=sum(p.extra for p in item_plans))
                 for name, item_plans in plans.items() if not needs_anything(item_plans)}
    receiving = [h for h in hosts if h.name not in outcomes]
    network = [h.name for h in receiving if not h.local]
    shape: Shape = fanout_shape(len(network), options.shape)
    tree = fanout_tree(network, shape)
    tree[HEAD] += [h.name for h in receiving if h.local]   # the head's own disk: no network
    by_name = {h.name: h for h in fleet.hosts}

    def argv_to(parent: str, child: str) -> list[str]:
        host = by_name[child]
        # A host forwarding to another has no ControlMaster dir of its own.
        options = ssh if parent == HEAD else replace(ssh, control_dir=None, host_key_policy="yes")
        return host_argv(host, agent_argv(fleet.python_for(host)), options=options)

    if receiving:
        roots = [{"host": name, "argv": argv_to(HEAD, name), "plan": node_plan(name, tree, plans, argv_to, options.stall_seconds)}
                 for name in tree[HEAD]]
        lines = _send(agent_code("node_main"), items, roots, options)
        outcomes |= {line["host"]: HostOutcome(host=line["host"], verdict=line["verdict"], bytes=line.get("bytes", 0),
                                               seconds=line.get("seconds", 0.0), extra=line.get("extra", 0),
                                               what=line.get("what", ""), path=line.get("path", ""),
                                               errno=line.get("errno")) for line in lines}
    ordered = [outcomes[h.name] for h in fleet.hosts if h.name in outcomes]
    described = describe_tree(tree, shape) if receiving else "nothing to send"
    return SyncReport(items=items, shape=described, outcomes=ordered)


def _send(code: bytes, items: Sequence[SyncItem], roots: list[dict[str, Any]], options: SyncOptions) -> list[dict]:
    """send_tree in a thread, so Ctrl-C reaches the head while the bytes flow."""
    result: dict[str, Any] = {}
    timeout = options.timeout

    def run() -> None:
        try:
            result["lines"] = send_tree(code, [i.frame() for i in items], [i.source for i in items], roots,
                                        stall=options.stall_seconds)
        except OSError as exc:
            result["error"] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise DeepfleetError(f"the sync did not finish within {timeout:.0f} s", where="sync",
                             fix="run it again: it resumes where it stopped", exit_code=1)
    if "error" in result:
        exc = result["error"]
        raise DeepfleetError(f"cannot read the source: {exc.strerror or exc}", where=f"head:{exc.filename or ''}",
                             fix="run it again when the source is stable", exit_code=1)
    return result["lines"]


def send_tree(code: bytes, items: list[dict[str, Any]], sources: list[str], roots: list[dict[str, Any]], *,
              stall: float) -> list[dict]:
    """Stream the source files (`sources[i]`: item i's path here) to the roots, each byte once per
    root that wants it; every host's result line."""
    fanout = Fanout([Child(entry, code, items) for entry in roots], stall)
    wants: tuple[dict, dict] = ({}, {})
    for child in fanout.children:
        merge_wants(wants, (child.wants, child.links))
    for item_key in sorted(wants[0], key=int):
        item, source = items[int(item_key)], sources[int(item_key)]
        for rel in sorted(wants[0][item_key]):
            targets = fanout.start_file(item_key, rel)
            position, size = min(start for _, start in targets), item["files"][rel]["size"]
            path = os.path.join(source, rel) if item["kind"] == "dir" else source
            with open(path, "rb") as handle:
                handle.seek(position)
                while position < size:
                    block = handle.read(min(CHUNK, size - position))
                    if not block:
                        raise OSError(errno.EIO, "the file shrank while it was being sent", path)
                    fanout.forward(targets, position, block)
                    position += len(block)
    for item_key in sorted(wants[1], key=int):
        for rel in sorted(wants[1][item_key]):
            fanout.link(item_key, rel)
    fanout.end()
    return [result for child in fanout.children for result in child.finish(timeout=600)]
