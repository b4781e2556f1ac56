"""What a host holds at a sync destination, and sending files back (stdlib only, Python >= 3.8).

Shipped with `remote_probe_manifest.py` and `remote_sync.py` (see there): `inspect_main` answers the
head's one question per host before a sync, `send_main` streams files to the head for a collection.
"""

import json
import os
import sys

if __name__ != "__main__":   # on the head; on a host these come from the concatenated code
    from deepfleet.fleet.remote_probe_manifest import content_digest, load_manifest, scan, write_manifest
    from deepfleet.fleet.remote_sync import CHUNK, frame_bytes, read_frame, staging_dir


def inspect_item(item, host, rehash):
    """What a host holds at one destination: digest, per-file sha256 when it differs, partials, room."""
    dest = item["dest"]
    found = {"exists": os.path.lexists(dest)}
    if os.path.islink(dest):
        found["dest_link"] = os.readlink(dest)
        return found
    if found["exists"]:
        is_dir = os.path.isdir(dest)
        if is_dir != (item["kind"] == "dir"):
            found["problem"] = "is a %s, the source is a %s" % ("directory" if is_dir else "file", item["kind"])
            return found
        stored = load_manifest(dest)
        try:
            held = scan(dest, None if rehash else stored)
        except OSError as error:
            found["problem"] = "cannot be read: %s" % (error.strerror or error)
            return found
        if held != stored:
            write_manifest(dest, held)
        # The usual re-sync holds what the source does: then no need to send every file's hash back.
        found["same"] = content_digest(held) == item.get("digest")
        if not found["same"]:
            found["files"] = {rel: entry["sha256"] for rel, entry in held["files"].items()}
            found["sizes"] = {rel: entry["size"] for rel, entry in held["files"].items()}
            found["links"] = {rel: link["target"] for rel, link in held["links"].items()}
    staging, suffix = staging_dir(item), ".%s.partial" % host
    try:
        found["partials"] = {name[:-len(suffix)]: os.path.getsize(os.path.join(staging, name))
                             for name in os.listdir(staging) if name.endswith(suffix)}
    except OSError:
        found["partials"] = {}
    existing = dest if item["kind"] == "dir" else os.path.dirname(dest)   # where new files are created
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    stats = os.statvfs(existing)
    found["free"] = stats.f_bavail * stats.f_frsize
    found["writable"] = os.access(existing, os.W_OK | os.X_OK) and not stats.f_flag & os.ST_RDONLY
    found["nearest"], found["device"] = existing, os.stat(existing).st_dev
    return found


def send_main():
    """The other way round: this host streams files it holds (the head collecting them), each from
    the byte the head already has: request {root, files: {rel: offset}}."""
    request, out = read_frame(sys.stdin.buffer), sys.stdout.buffer
    for rel, offset in sorted(request["files"].items()):
        with open(os.path.join(request["root"], rel), "rb") as handle:
            remaining = os.fstat(handle.fileno()).st_size - offset
            out.write(frame_bytes({"t": "file", "i": 0, "rel": rel, "off": offset}))
            handle.seek(offset)
            while remaining > 0:
                block = handle.read(min(CHUNK, remaining))
                if not block:
                    raise OSError("%s shrank while it was being sent" % rel)
                out.write(block)
                remaining -= len(block)
    out.write(frame_bytes({"t": "end"}))
    out.flush()


def inspect_main():
    request = read_frame(sys.stdin.buffer)
    found = [inspect_item(item, request["host"], request.get("rehash", False)) for item in request["items"]]
    sys.stdout.write(json.dumps({"items": found}) + "\n")
