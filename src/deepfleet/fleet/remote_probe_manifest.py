"""Content manifests (stdlib only, Python >= 3.8; runs on each host inside the probe, and on the head).

A manifest lists every file under a path with its size, mtime and sha256, and the symlinks inside
it. It is kept beside the data (`DIR/.deepfleet-manifest.json`, or `.NAME.deepfleet-manifest.json`
next to a single file), so a later scan re-hashes only files whose size or mtime changed: comparing
a 10,000-file model dir across hosts costs a directory walk, not a re-read of every byte.
"""

import hashlib
import json
import os

MANIFEST_NAME = ".deepfleet-manifest.json"
STAGING_DIR = ".deepfleet-sync"       # `deepfleet sync`'s partial files, beside the data; never content
MANIFEST_VERSION = 1


def is_manifest_file(name):
    """Manifests (and their temp files) are never content: their mtimes differ from host to host."""
    return name == MANIFEST_NAME or ".deepfleet-manifest.json" in name


def manifest_path(path):
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST_NAME)
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".deepfleet-manifest.json")


def file_sha256(path, limit_bytes=None):
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            if not block:
                return digest.hexdigest()
            size += len(block)
            if limit_bytes is not None and size > limit_bytes:
                return None
            digest.update(block)


def _walk(root):
    """(relative path, absolute path) of every entry under root, in a stable order; symlinks not followed."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != STAGING_DIR)
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            full = os.path.join(directory, name)
            if not is_manifest_file(name):
                yield os.path.relpath(full, root), full


def _inside(root, link_path):
    target = os.path.realpath(link_path)
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def scan(path, previous=None, limit_bytes=None):
    """The manifest of `path` (a file or a dir); entries of `previous` whose size and mtime match are reused."""
    path = os.path.abspath(path)
    known = (previous or {}).get("files", {})
    files, links = {}, {}
    entries = _walk(path) if os.path.isdir(path) else [(os.path.basename(path), path)]
    root = path if os.path.isdir(path) else os.path.dirname(path)
    for relative, full in entries:
        if os.path.islink(full):
            links[relative] = {"target": os.readlink(full), "inside": _inside(root, full)}
            continue
        stat = os.stat(full)
        old = known.get(relative)
        if old and old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns and old.get("sha256"):
            sha = old["sha256"]
        else:
            sha = file_sha256(full, limit_bytes)
        files[relative] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    return {"version": MANIFEST_VERSION, "kind": "dir" if os.path.isdir(path) else "file",
            "files": files, "links": links}


def content_digest(manifest):
    """One sha256 over what matters for equality: each file's path and content, each link's target."""
    digest = hashlib.sha256()
    for relative in sorted(manifest["files"]):
        digest.update(("f %s %s\n" % (relative, manifest["files"][relative]["sha256"])).encode())
    for relative in sorted(manifest["links"]):
        digest.update(("l %s %s\n" % (relative, manifest["links"][relative]["target"])).encode())
    return digest.hexdigest()


def load_manifest(path):
    try:
        with open(manifest_path(path)) as handle:
            data = json.load(handle)
        return data if data.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError, AttributeError):
        return None


def write_manifest(path, manifest):
    """Atomically (temp name, fsync, rename); False when the place is not writable (read-only data)."""
    target = manifest_path(path)
    temporary = "%s.%d.tmp" % (target, os.getpid())
    try:
        with open(temporary, "w") as handle:
            json.dump(manifest, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        return True
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False


def refreshed_manifest(path, limit_bytes=None):
    """Scan `path` reusing its stored manifest, and store the result beside it when that is possible."""
    stored = load_manifest(path)
    manifest = scan(path, stored, limit_bytes)
    if manifest != stored:
        write_manifest(path, manifest)
    return manifest


def path_summary(path, limit_bytes=None):
    """What doctor compares across hosts for one path: its digest, counts and per-file hashes."""
    if not os.path.exists(path):
        return {"exists": False}
    try:
        manifest = refreshed_manifest(path, limit_bytes)
    except OSError as exc:
        return {"exists": True, "error": exc.strerror or str(exc)}
    if any(entry["sha256"] is None for entry in manifest["files"].values()):
        return {"exists": True, "error": "larger than the checksum limit"}
    return {"exists": True, "kind": manifest["kind"], "digest": content_digest(manifest),
            "files": {relative: entry["sha256"] for relative, entry in manifest["files"].items()},
            "links": {relative: link["target"] for relative, link in manifest["links"].items()},
            "bytes": sum(entry["size"] for entry in manifest["files"].values())}
