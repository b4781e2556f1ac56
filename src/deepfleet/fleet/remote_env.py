"""Runs ON each host (stdlib only, Python >= 3.8) for `deepfleet env`: one JSON line per call.

`report(params)` (sent as `python -` stdin) answers which versions of the named distributions
this python has, and what kind of python it is. `install(params)` (sent as `python -c`, with the
wheels as a tar stream on stdin) unpacks the wheels into a fresh temp dir and runs pip there
without an index, so hosts need no internet. Each reports its failing stage, so the head can
tell "cannot write the temp dir" from "pip failed".
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions():
    """canonical name -> version, the first on sys.path winning (as `import` and pip see it)."""
    import importlib.metadata as metadata
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and canonical(name) not in found:
            found[canonical(name)] = dist.version
    return found


def report(params):
    import importlib.util
    versions = installed_versions()
    print(json.dumps({
        "executable": sys.executable, "python_version": platform.python_version(),
        "machine": platform.machine(), "prefix": sys.prefix, "base_prefix": sys.base_prefix,
        "conda": os.path.isdir(os.path.join(sys.prefix, "conda-meta")),
        "pip": importlib.util.find_spec("pip") is not None,
        "versions": {name: versions.get(canonical(name)) for name in params["names"]},
    }), flush=True)


def _unpack_wheels(stream, target):
    """Only plain `*.whl` files with no directory part: the head sends nothing else."""
    names = []
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if not member.isfile() or "/" in member.name or not member.name.endswith(".whl"):
                raise ValueError("unexpected entry " + repr(member.name))
            with archive.extractfile(member) as source, open(os.path.join(target, member.name), "wb") as sink:
                shutil.copyfileobj(source, sink)
            names.append(member.name)
    return names


def install(params):
    def done(**result):
        print(json.dumps(result), flush=True)
    try:
        target = tempfile.mkdtemp(prefix="deepfleet-env-")
    except OSError as exc:
        return done(stage="tempdir", error="%s: %s" % (tempfile.gettempdir(), exc.strerror or exc))
    try:
        try:
            _unpack_wheels(sys.stdin.buffer, target)
        except OSError as exc:
            return done(stage="tempdir", error="%s: %s" % (target, exc.strerror or exc))
        except (ValueError, tarfile.TarError) as exc:
            return done(stage="receive", error=str(exc))
        argv = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-input",
                "--disable-pip-version-check", "--find-links", target] + params["requirements"]
        pip = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
        lines = [line.strip() for line in pip.stdout.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        done(stage="pip", returncode=pip.returncode, last_error=(errors or lines or [""])[-1][:400])
    finally:
        shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) > 1:   # `python -c <this file> <params>`
    install(json.loads(sys.argv[1]))
