"""Collect a dir that is spread over hosts without shared storage (a checkpoint's shards) onto the head.

Each host says what it holds under the dir (`remote_holdings.inspect_item`: sha256 and size per file);
every file the head lacks is pulled from one host that has it (`remote_holdings.send_main`), written
the way `deepfleet sync` writes (temp name, fsync, rename) and checked against the sha256 the host
reported. Bytes of a pull that was cut off are kept, and the next collection resumes from them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.remote_probe_manifest import refreshed_manifest
from deepfleet.fleet.remote_sync import Fanout, Receiver, partial_path, receive
from deepfleet.fleet.ssh import host_argv, options_for
from deepfleet.fleet.sync import agent_argv, agent_code, agent_stdin, inspect_hosts

Holding = dict[str, tuple[str, int]]   # rel -> (sha256, size)


@dataclass(frozen=True, kw_only=True)
class Pulled:
    host: str
    files: int
    bytes: int
    problem: str = ""


def held_here(path: str) -> Holding:
    if not os.path.isdir(path):
        return {}
    manifest = refreshed_manifest(path)
    return {rel: (entry["sha256"], entry["size"]) for rel, entry in manifest["files"].items()}


def holdings(fleet: Fleet, path: str) -> dict[str, Holding]:
    """What each host (the head's own disk as "head") holds under `path`."""
    remote = [h for h in fleet.hosts if not h.local]
    found = inspect_hosts(fleet, remote, [{"dest": path, "kind": "dir"}], rehash=False, options=options_for(fleet),
                          timeout=600) if remote else {}
    held = {"head": held_here(path)}
    for host in remote:
        item = found[host.name][0]
        if item.get("problem"):
            raise DeepfleetError(f"cannot read: {item['problem']}", where=f"{host.name}:{path}", fix="check it there")
        held[host.name] = {rel: (sha, item["sizes"][rel]) for rel, sha in item.get("files", {}).items()}
    return held


def sources_for(wanted: Sequence[str], held: dict[str, Holding], *, prefer: str = "head") -> dict[str, list[str]]:
    """host -> the files to pull from it: each wanted file from the head when it has it, else from the
    first host that does; a file nobody has is left out (the caller checks what is complete)."""
    plan: dict[str, list[str]] = {}
    for rel in wanted:
        holders = [h for h in held if rel in held[h]]
        if holders and prefer not in holders:
            plan.setdefault(holders[0], []).append(rel)
    return plan


def pull(fleet: Fleet, host: Host, remote_root: str, files: dict[str, tuple[str, int]], into: str) -> Pulled:
    """Stream `files` (rel -> (sha256, size)) from `host`'s `remote_root` into the head's `into`."""
    now = time.time_ns()
    items = [{"dest": into, "kind": "dir", "links": {},
              "files": {rel: {"sha256": sha, "size": size, "mtime_ns": now, "mode": 0o644}
                        for rel, (sha, size) in files.items()}}]
    offsets = {}
    for rel, (sha, size) in files.items():
        partial = partial_path(items[0], sha, host.name)
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        offsets[rel] = have if have <= size else 0
    receiver = Receiver({"host": host.name, "want": {"0": offsets}, "links": {}}, items)
    argv = host_argv(host, agent_argv(fleet.python_for(host)), options=options_for(fleet))
    request = agent_stdin(agent_code("send_main"), {"root": remote_root, "files": offsets})
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                   start_new_session=True)
        feeder = threading.Thread(target=_feed, args=(process, request), daemon=True)
        feeder.start()
        cut_off = receive(process.stdout, receiver, Fanout([]))
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        errors.seek(0)
        last = (errors.read().decode(errors="replace").strip().splitlines() or [""])[-1]
    result = receiver.result(cut_off)
    problem = "" if result["verdict"] == "verified" else f"{result.get('what', 'failed')} {last}".strip()
    return Pulled(host=host.name, files=len(files), bytes=result["bytes"], problem=problem)


def _feed(process: subprocess.Popen, data: bytes) -> None:
    try:
        process.stdin.write(data)
        process.stdin.close()
    except OSError:
        pass


def collect(fleet: Fleet, path: str, into: str, held: dict[str, Holding], plan: dict[str, list[str]]) -> list[Pulled]:
    """Pull every host's part of `plan` at once; one error line per host that failed."""
    by_name = {h.name: h for h in fleet.hosts}
    results: dict[str, Pulled] = {}

    def one(name: str) -> None:
        try:
            results[name] = pull(fleet, by_name[name], path, {rel: held[name][rel] for rel in plan[name]}, into)
        except OSError as exc:
            results[name] = Pulled(host=name, files=0, bytes=0, problem=exc.strerror or str(exc))
    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pulled = [results[name] for name in plan]
    problems = [Problem(where=f"{p.host}:{path}", what=f"collecting failed: {p.problem}",
                        fix="run the same command again: it resumes") for p in pulled if p.problem]
    if problems:
        raise DeepfleetError(problems=problems, exit_code=1)
    return pulled


def described(pulled: Sequence[Pulled]) -> list[str]:
    return [f"collected {p.files} file(s), {p.bytes / 2**20:,.1f} MiB from {p.host} (sha256 verified)" for p in pulled]
