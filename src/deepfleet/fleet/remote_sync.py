"""The sync stream (stdlib only, Python >= 3.8): runs on every host, and on the head as the sender.

It is shipped after `remote_probe_manifest.py` to `python -c BOOTSTRAP`, which reads the code from
stdin; the rest of stdin is the stream. A stream is frames: a JSON line, then `n` payload bytes.

    plan   this host's part: which files it wants (and from which byte), which links, what to
           delete, and its children: the argv that reaches each, and each child's own plan
    items  the source manifests, the same for every host
    file   one file's bytes from offset `off` (the smallest offset anyone below still needs)
    link   one symlink
    end    nothing more: finish, verify, report

A host writes what it wants and forwards what its children want while it reads, so the head sends
each byte once per child of its own, and a tree or chain of hosts carries the rest. A file appears
only complete (temp name, fsync, rename); bytes cut off mid-file stay in
`.deepfleet-sync/<sha256>.<host>.partial`, from where the next sync resumes. At the end every host
re-scans what it holds against the source manifest and prints one JSON result line per host below it.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

if __name__ != "__main__":   # on the head; on a host these come from the concatenated manifest code
    from deepfleet.fleet.remote_probe_manifest import STAGING_DIR, load_manifest, scan, write_manifest

# CODE: the code itself, which a host ships on to its children.
BOOTSTRAP = ("import sys;b=sys.stdin.buffer;n=int(b.readline());CODE=b.read(n);"
             "exec(compile(CODE,'deepfleet-sync','exec'))")
CHUNK = 1 << 20
STALL_SECONDS = 120   # a host that takes no bytes for this long is cut loose; the plan frame can override


class CutOff(Exception):
    """The stream ended mid-frame: the sender went away."""


def frame_bytes(header):
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def read_frame(stream):
    line = stream.readline()
    if not line.endswith(b"\n"):
        raise CutOff()
    return json.loads(line)


def staging_dir(item):
    return os.path.join(item["dest"] if item["kind"] == "dir" else os.path.dirname(item["dest"]), STAGING_DIR)


def target_path(item, rel):
    return os.path.join(item["dest"], rel) if item["kind"] == "dir" else item["dest"]


def partial_path(item, sha, host):
    return os.path.join(staging_dir(item), "%s.%s.partial" % (sha, host))


def subtree_wants(plan):
    """{item: {rel: offset}} and {item: set(links)} wanted anywhere in this plan's subtree."""
    files = {item: dict(wanted) for item, wanted in plan["want"].items()}
    links = {item: set(rels) for item, rels in plan["links"].items()}
    for child in plan.get("children", []):
        merge_wants((files, links), subtree_wants(child["plan"]))
    return files, links


def merge_wants(into, wants):
    for item, wanted in wants[0].items():
        mine = into[0].setdefault(item, {})
        for rel, offset in wanted.items():
            mine[rel] = min(offset, mine.get(rel, offset))
    for item, rels in wants[1].items():
        into[1].setdefault(item, set()).update(rels)


class Child:
    """One host this one forwards to: an ssh process fed on stdin, its result lines read from stdout."""

    def __init__(self, entry, code, items):
        self.host, self.plan = entry["host"], entry["plan"]
        self.wants, self.links = subtree_wants(self.plan)
        self.lines, self.error = [], ""
        self.process = subprocess.Popen(entry["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self.readers = [threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True),
                        threading.Thread(target=self._read_error, daemon=True)]
        for reader in self.readers:
            reader.start()
        self.alive, self.stalled, self.writing_since = True, False, None
        self.send(b"%d\n" % len(code) + code)
        self.frame({"t": "plan", **self.plan})
        self.frame({"t": "items", "items": items})

    def _read(self, stream, into):
        for line in stream:
            into.append(line.decode(errors="replace"))

    def _read_error(self):
        self.error = self.process.stderr.read().decode(errors="replace")

    def send(self, data):
        if self.alive and data:
            self.writing_since = time.monotonic()
            try:
                self.process.stdin.write(data)
            except (BrokenPipeError, OSError):
                self.alive = False
            finally:
                self.writing_since = None

    def kill(self):
        try:
            os.killpg(self.process.pid, 9)
        except OSError:
            pass

    def frame(self, header):
        self.send(frame_bytes(header))

    def finish(self, timeout):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        for reader in self.readers:
            reader.join(5)
        results = [json.loads(line) for line in self.lines if line.startswith("{")]
        reported = {result["host"] for result in results}
        last = "it took no data for %d s" % self.stalled if self.stalled else \
            (self.error.strip().splitlines() or ["exit %s" % code])[-1]
        return results + [{"host": host, "verdict": "failed", "bytes": 0, "seconds": 0,
                           "what": "no report (via %s: %s)" % (self.host, last)}
                          for host in hosts_in(self.plan) if host not in reported]


def hosts_in(plan):
    return [plan["host"]] + [host for child in plan.get("children", []) for host in hosts_in(child["plan"])]


class Fanout:
    """Send frames to children, each getting only what its subtree wants, from its own offset. A
    child that takes nothing for `stall` seconds (stopped, or stuck behind a host that is) is killed,
    so the others go on and it is reported failed instead of holding everyone up."""

    def __init__(self, children, stall=STALL_SECONDS):
        self.children, self.stall, self.done = children, stall, False
        if children:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self.done:
            time.sleep(min(1.0, self.stall / 4))
            for child in self.children:
                since = child.writing_since
                if since is not None and time.monotonic() - since > self.stall:
                    child.stalled = self.stall
                    child.kill()

    def start_file(self, item, rel):
        """Send the file's header to each child that wants it; (child, its first byte) for `forward`."""
        targets = [(child, child.wants[item][rel]) for child in self.children if rel in child.wants.get(item, {})]
        for child, start in targets:
            child.frame({"t": "file", "i": int(item), "rel": rel, "off": start})
        return targets

    @staticmethod
    def forward(targets, position, block):
        """Send each target the part of `block` (at byte `position` of the file) from its first byte on."""
        for child, start in targets:
            if position + len(block) > start:
                child.send(block[max(0, start - position):])

    def link(self, item, rel):
        for child in self.children:
            if rel in child.links.get(item, ()):
                child.frame({"t": "link", "i": item, "rel": rel})

    def end(self):
        for child in self.children:
            child.frame({"t": "end"})
        self.done = True


class FileWriter:
    """One wanted file: appends to its partial from `start`, hashing as it goes; `close` renames it in."""

    def __init__(self, item, rel, entry, host, start):
        self.item, self.rel, self.entry, self.start = item, rel, entry, start
        self.path = partial_path(item, entry["sha256"], host)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if start and (not os.path.exists(self.path) or os.path.getsize(self.path) < start):
            raise OSError("%s changed since the sync began; sync again" % self.path)
        self.digest = hashlib.sha256()
        with open(self.path, "rb") if start else open(os.devnull, "rb") as prefix:
            remaining = start
            while remaining:
                block = prefix.read(min(CHUNK, remaining))
                self.digest.update(block)
                remaining -= len(block)
        self.handle = open(self.path, "r+b" if start else "wb")
        self.handle.truncate(start)
        self.handle.seek(start)

    def write(self, data):
        self.handle.write(data)
        self.digest.update(data)

    def keep(self):
        """Cut off: the bytes so far stay for the next sync."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self):
        self.handle.close()
        remove_quietly(self.path)

    def close(self):
        self.keep()
        if self.digest.hexdigest() != self.entry["sha256"]:
            remove_quietly(self.path)
            raise OSError("content differs from the source after transfer (sha256); sync again")
        os.chmod(self.path, self.entry.get("mode", 0o644))
        os.utime(self.path, ns=(self.entry["mtime_ns"], self.entry["mtime_ns"]))
        target = target_path(self.item, self.rel)
        make_parents(self.item, self.rel)
        os.replace(self.path, target)
        fsync_dir(os.path.dirname(target))


def make_parents(item, rel):
    """Create rel's parent dirs under dest, refusing to write through a symlink that leaves it."""
    if item["kind"] != "dir":
        os.makedirs(os.path.dirname(item["dest"]), exist_ok=True)
        return
    if rel.startswith("/") or ".." in rel.split("/"):
        raise OSError("refusing a path outside %s" % item["dest"])
    current = item["dest"]
    for part in rel.split("/")[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise OSError("%s is a symlink: writing through it could leave %s" % (current, item["dest"]))
    os.makedirs(os.path.dirname(os.path.join(item["dest"], rel)), exist_ok=True)


def fsync_dir(path):
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class Receiver:
    """This host's side: writes what it wants, records what went wrong, verifies at the end."""

    def __init__(self, plan, items):
        self.host, self.plan, self.items = plan["host"], plan, items
        self.written, self.problem = 0, None
        self.landed = {}     # item -> {rel: manifest entry} of the files written here: known, not re-hashed
        self.started = self.heard = time.monotonic()   # heard: when the last bytes came in

    def fail(self, item, rel, error):
        if self.problem is None:
            path = target_path(self.items[item], rel) if rel else self.items[item]["dest"]
            self.problem = {"path": path, "what": getattr(error, "strerror", None) or str(error),
                            "errno": getattr(error, "errno", None)}

    def start_file(self, item_key, rel, stream_offset):
        wanted = self.plan["want"].get(item_key, {})
        if self.problem or rel not in wanted:
            return None
        item = self.items[int(item_key)]
        entry = item["files"][rel]
        try:
            return FileWriter(item, rel, entry, self.host, max(stream_offset, wanted[rel]))
        except OSError as error:
            self.fail(int(item_key), rel, error)
            return None

    def link(self, item_key, rel):
        if self.problem or rel not in self.plan["links"].get(item_key, ()):
            return
        item = self.items[int(item_key)]
        target, temporary = target_path(item, rel), "%s.%s.deepfleet-link" % (target_path(item, rel), self.host)
        try:
            make_parents(item, rel)
            remove_quietly(temporary)
            os.symlink(item["links"][rel], temporary)
            os.replace(temporary, target)
        except OSError as error:
            remove_quietly(temporary)
            self.fail(int(item_key), rel, error)

    def delete_extras(self):
        for item_key, rels in self.plan.get("delete", {}).items():
            for rel in rels:
                try:
                    os.unlink(target_path(self.items[int(item_key)], rel))
                except FileNotFoundError:
                    pass
                except OSError as error:
                    self.fail(int(item_key), rel, error)

    def verify(self):
        """Re-scan each item (reusing the stored manifest) and compare with the source's."""
        extra = 0
        for index, item in enumerate(self.items):
            if not os.path.exists(item["dest"]):
                if self.problem is None:
                    self.problem = {"path": item["dest"], "what": "missing after the sync"}
                continue
            known = load_manifest(item["dest"]) or {"files": {}}
            known["files"].update(self.landed.get(index, {}))
            held = scan(item["dest"], known)
            write_manifest(item["dest"], held)
            wrong = sorted(rel for rel, entry in item["files"].items()
                           if held["files"].get(rel, {}).get("sha256") != entry["sha256"])
            wrong += sorted(rel for rel, target in item["links"].items()
                            if held["links"].get(rel, {}).get("target") != target)
            extra += len(set(held["files"]) - set(item["files"])) + len(set(held["links"]) - set(item["links"]))
            if wrong and self.problem is None:
                self.problem = {"path": target_path(item, wrong[0]),
                                "what": "differs from the source after the sync (%d file(s))" % len(wrong)}
            clean_staging(item)
        return extra

    def result(self, cut_off):
        if not cut_off:
            self.delete_extras()
        extra = 0 if cut_off else self.verify()
        verdict = "failed" if self.problem or cut_off else "verified"
        result = {"host": self.host, "verdict": verdict, "bytes": self.written,
                  "seconds": round(time.monotonic() - self.started, 3), "extra": extra}
        if cut_off and not self.problem:
            result["what"] = "cut off mid-stream; the bytes received are kept, sync again to resume"
        elif self.problem:
            result.update(self.problem)
        return result


def clean_staging(item):
    try:
        os.rmdir(staging_dir(item))
    except OSError:
        pass


def receive(stream, receiver, fanout):
    """Read frames until `end`; True when the stream was cut off first."""
    try:
        while True:
            header = read_frame(stream)
            receiver.heard = time.monotonic()
            kind = header["t"]
            if kind == "end":
                fanout.end()
                return False
            if kind == "link":
                receiver.link(str(header["i"]), header["rel"])
                fanout.link(str(header["i"]), header["rel"])
            elif kind == "file":
                relay_file(header, stream, receiver, fanout)
    except CutOff:
        return True


def relay_file(header, stream, receiver, fanout):
    item_key, rel, offset = str(header["i"]), header["rel"], header["off"]
    size = receiver.items[int(item_key)]["files"][rel]["size"]
    targets = fanout.start_file(item_key, rel)
    writer = receiver.start_file(item_key, rel, offset)
    position = offset
    try:
        while position < size:
            block = stream.read(min(CHUNK, size - position))
            if not block:
                raise CutOff()
            receiver.heard = time.monotonic()
            fanout.forward(targets, position, block)
            if writer:
                skip = max(0, writer.start - position)
                if skip < len(block):
                    try:
                        writer.write(block[skip:])
                        receiver.written += len(block) - skip
                    except OSError as error:
                        writer.discard()
                        receiver.fail(int(item_key), rel, error)
                        writer = None
            position += len(block)
        if writer:
            try:
                writer.close()
                entry = writer.entry
                receiver.landed.setdefault(int(item_key), {})[rel] = {
                    "size": entry["size"], "mtime_ns": entry["mtime_ns"], "sha256": entry["sha256"]}
            except OSError as error:
                remove_quietly(writer.path)
                receiver.fail(int(item_key), rel, error)
    except CutOff:
        if writer:
            writer.keep()
        raise


def give_up_when_starved(receiver, fanout):
    """The sender stopped without closing the stream (its host froze): its own watchdog cuts it
    loose after `stall` seconds, so silence for three times that means nobody will: exit, and let
    the hosts below see their streams end."""
    while not fanout.done:
        time.sleep(min(1.0, fanout.stall / 4))
        if time.monotonic() - receiver.heard > 3 * fanout.stall:
            for child in fanout.children:
                child.kill()
            os._exit(1)


def node_main():
    """A host of the tree: receive, forward, verify, then print every result line below it."""
    stream, out = sys.stdin.buffer, sys.stdout
    plan, items = read_frame(stream), read_frame(stream)["items"]
    receiver = Receiver(plan, items)
    children = [Child(entry, globals()["CODE"], items) for entry in plan.get("children", [])]
    fanout = Fanout(children, plan.get("stall", STALL_SECONDS))
    threading.Thread(target=give_up_when_starved, args=(receiver, fanout), daemon=True).start()
    cut_off = receive(stream, receiver, fanout)
    fanout.done = True
    results = [receiver.result(cut_off)]
    for child in children:
        results += child.finish(timeout=600)
    for result in results:
        out.write(json.dumps(result) + "\n")
    out.flush()
