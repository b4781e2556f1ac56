"""What `deepfleet sync` sends where: pure functions of the source manifests and what each host holds.

- `host_item_plan`: from one host's inspection of one destination, the files it lacks (and the
  byte each resumes from), the links, what `--delete` removes, and why it cannot be written.
- `fanout_shape` / `fanout_tree`: who forwards to whom. The head feeds at most two hosts, so its
  uplink carries the data at most twice however large the fleet: every host to itself (direct) for
  one or two hosts, one pipelined chain up to CHAIN_MAX hosts (each host receives and sends the data
  once, as NCCL's ring broadcast does), and a binary tree beyond, where a chain gets long enough
  that one slow or lost host stalls too many behind it.
- `node_plan`: the nested plan frame each root receives (see `remote_sync.py`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from deepfleet.fleet.remote_probe_manifest import content_digest

Shape = Literal["direct", "chain", "tree"]
CHAIN_MAX = 8
HEAD = "head"


@dataclass(frozen=True, kw_only=True)
class SyncItem:
    """One PATH: where it is on the head, where it goes on the hosts, and its manifest."""

    source: str
    dest: str
    kind: Literal["dir", "file"]
    files: dict[str, dict[str, Any]]     # rel -> {sha256, size, mtime_ns, mode}
    links: dict[str, str]                # rel -> link target

    @property
    def size(self) -> int:
        return sum(entry["size"] for entry in self.files.values())

    @property
    def digest(self) -> str:
        """The manifest's content digest, as `remote_probe_manifest.content_digest` computes it on a host."""
        return content_digest({"files": self.files, "links": {rel: {"target": t} for rel, t in self.links.items()}})

    def frame(self) -> dict[str, Any]:
        return {"dest": self.dest, "kind": self.kind, "files": self.files, "links": self.links}


@dataclass(frozen=True, kw_only=True)
class HostItemPlan:
    want: dict[str, int] = field(default_factory=dict)       # rel -> byte to resume from
    links: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    extra: int = 0                                           # files there and not in the source, kept
    send_bytes: int = 0
    problem: str | None = None                               # why this host cannot take it
    path: str = ""                                           # where on the host the problem is


def destination(source: str, to: str | None) -> str:
    return posixpath.join(to, posixpath.basename(source.rstrip("/"))) if to else source


def _below(rel: str) -> list[str]:
    """rel's ancestors inside the tree: a/b/c -> [a, a/b]."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _refusal(problem: str, path: str) -> HostItemPlan:
    return HostItemPlan(problem=problem, path=path)


def host_item_plan(item: SyncItem, found: dict[str, Any], *, delete: bool) -> HostItemPlan:
    """What this host needs of `item`, from its inspection (`remote_holdings.inspect_item`)."""
    if found.get("problem"):
        return _refusal(found["problem"], item.dest)
    if found.get("same"):
        return HostItemPlan()
    if found.get("dest_link"):
        return _refusal(f"is a symlink to {found['dest_link']}: writing through it would put the data outside "
                        f"{item.dest}", item.dest)
    held_files, held_links = found.get("files", {}), found.get("links", {})
    want = {rel: entry for rel, entry in item.files.items() if held_files.get(rel) != entry["sha256"]}
    links = tuple(sorted(rel for rel, target in item.links.items() if held_links.get(rel) != target))
    held_dirs = {up for name in held_files for up in _below(name)}
    for rel in [*want, *links]:
        through = next((up for up in _below(rel) if up in held_links), None)
        if through:
            return _refusal(f"is a symlink to {held_links[through]} there, a directory in the source: writing "
                            f"through it would leave {item.dest}", posixpath.join(item.dest, through))
        if rel in held_dirs:
            return _refusal("is a directory there, a file in the source", posixpath.join(item.dest, rel))
    extras = sorted({*held_files, *held_links} - {*item.files, *item.links})
    partials = found.get("partials", {})
    offsets = {rel: partials.get(entry["sha256"], 0) if partials.get(entry["sha256"], 0) <= entry["size"] else 0
               for rel, entry in want.items()}
    send_bytes = sum(item.files[rel]["size"] - offset for rel, offset in offsets.items())
    if (offsets or links or (delete and extras)) and not found.get("writable", True):
        return _refusal("is not writable (read-only or no permission)", found.get("nearest", item.dest))
    return HostItemPlan(want=offsets, links=links, delete=tuple(extras) if delete else (),
                        extra=0 if delete else len(extras), send_bytes=send_bytes)


def space_problem(plans: Sequence[HostItemPlan], found: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """(path, problem) when what a host is sent does not fit its filesystems (items summed per device)."""
    needed: dict[Any, int] = {}
    for plan, held in zip(plans, found):
        needed[held.get("device")] = needed.get(held.get("device"), 0) + plan.send_bytes
    for plan, held in zip(plans, found):
        if needed[held.get("device")] > held.get("free", needed[held.get("device")]):
            need, free = needed[held.get("device")], held["free"]
            return held.get("nearest", ""), f"no space: needs {need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB free"
    return None


def fanout_shape(host_count: int, requested: str = "auto") -> Shape:
    if requested in ("direct", "chain", "tree"):
        return requested   # type: ignore[return-value]
    return "direct" if host_count <= 2 else "chain" if host_count <= CHAIN_MAX else "tree"


def fanout_tree(names: Sequence[str], shape: Shape) -> dict[str, list[str]]:
    """parent -> children, the head included as HEAD; every name appears as a child exactly once."""
    tree: dict[str, list[str]] = {HEAD: []}
    for index, name in enumerate(names):
        if shape == "direct":
            parent = HEAD
        elif shape == "chain":
            parent = names[index - 1] if index else HEAD
        else:   # binary: the head feeds 0 and 1, host k feeds 2k+2 and 2k+3
            parent = HEAD if index < 2 else names[(index - 2) // 2]
        tree.setdefault(parent, []).append(name)
        tree.setdefault(name, [])
    return tree


def describe_tree(tree: dict[str, list[str]], shape: Shape) -> str:
    """e.g. `chain: head -> h1 -> h2 -> h3` or `tree: head -> h1, h2; h1 -> h3, h4`."""
    if shape == "chain":
        path, node = [HEAD], HEAD
        while tree.get(node):
            node = tree[node][0]
            path.append(node)
        return "chain: " + " -> ".join(path)
    return f"{shape}: " + "; ".join(f"{parent} -> {', '.join(children)}" for parent, children in tree.items()
                                     if children)


def node_plan(name: str, tree: dict[str, list[str]], plans: dict[str, list[HostItemPlan]],
              argv_to: Callable[[str, str], list[str]], stall: float) -> dict[str, Any]:
    """The plan frame for `name` and everything below it; `argv_to(parent, child)` reaches a child,
    and a child that takes no bytes for `stall` seconds is cut loose."""
    mine = plans[name]
    return {"host": name, "stall": stall,
            "want": {str(i): p.want for i, p in enumerate(mine) if p.want},
            "links": {str(i): list(p.links) for i, p in enumerate(mine) if p.links},
            "delete": {str(i): list(p.delete) for i, p in enumerate(mine) if p.delete},
            "children": [{"host": child, "argv": argv_to(name, child),
                          "plan": node_plan(child, tree, plans, argv_to, stall)} for child in tree.get(name, [])]}


def needs_anything(plans: Sequence[HostItemPlan]) -> bool:
    return any(p.want or p.links or p.delete for p in plans)
