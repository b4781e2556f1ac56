"""Where the head gets the wheel of each distribution a host needs (pure, except listing dirs).

In order: a wheel file already on the head (`--wheel-dir`, deepfleet's download cache, pip's
cache of wheels it built), then deepfleet built from its source dir when the head runs a
source install of it (editable or `pip install .`: there is no wheel to copy), then
`pip download --no-deps` on the head. Hosts only ever get files: they need no internet.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal
from urllib.parse import unquote, urlparse

from deepfleet.fleet.package_sets import Dist, canonical_name, same_version

DOWNLOAD_CACHE = Path("~/.cache/deepfleet/wheels")
PIP_WHEEL_CACHE = Path("~/.cache/pip/wheels")


@dataclass(frozen=True, kw_only=True)
class WheelName:
    """The parts of a wheel file name: `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`."""

    name: str
    version: str
    python: tuple[str, ...]
    abi: tuple[str, ...]
    platform: tuple[str, ...]


def parse_wheel_name(file_name: str) -> WheelName | None:
    if not file_name.endswith(".whl"):
        return None
    parts = file_name[:-4].split("-")
    if len(parts) not in (5, 6):
        return None
    name, version, *_, python, abi, platform = parts
    return WheelName(name=name, version=version, python=tuple(python.split(".")), abi=tuple(abi.split(".")),
                     platform=tuple(platform.split(".")))


@dataclass(frozen=True, kw_only=True)
class Interpreter:
    """The host python a wheel must suit."""

    version: str            # "3.11.7"
    machine: str            # "x86_64", "aarch64"

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


def suits(wheel: WheelName, python: Interpreter) -> bool:
    """A close approximation of pip's tag check, to pick a file; pip on the host has the last word."""
    major, minor = (int(p) for p in python.major_minor.split("."))
    exact = {f"py{major}", f"py{major}{minor}", f"cp{major}{minor}"}

    def python_ok(tag: str) -> bool:
        if tag in exact:
            return True
        if "abi3" in wheel.abi and tag.startswith(f"cp{major}") and tag[2:].isdigit():
            return int(tag[3:] or 0) <= minor    # stable ABI: built for 3.N works on 3.N and later
        return False
    abi_ok = any(a in ("none", "abi3") or a.startswith(f"cp{major}{minor}") for a in wheel.abi)
    platform_ok = any(p == "any" or p.endswith(python.machine) for p in wheel.platform)
    return any(python_ok(t) for t in wheel.python) and abi_ok and platform_ok


@dataclass(frozen=True, kw_only=True)
class WheelSource:
    """How one wheel reaches the head: an existing file, a build, or a download."""

    dist: Dist
    kind: Literal["file", "build", "download"]
    path: Path | None = None           # the file (kind "file")
    size: int | None = None
    source: Path | None = None         # the source dir (kind "build"), copied to a temp dir to build
    command: tuple[str, ...] = ()      # what runs on the head (kind "build" / "download")

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.path} ({human_size(self.size or 0)})"
        if self.kind == "build":
            return f"build from {self.source}: {shlex.join(self.command)}"
        return f"download: {shlex.join(self.command)}"


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def wheel_files(dirs: Iterable[Path]) -> list[Path]:
    """Every *.whl under these dirs (pip's cache nests them), first dir first."""
    found = []
    for directory in dirs:
        directory = directory.expanduser()
        if directory.is_dir():
            found += sorted(directory.rglob("*.whl"))
    return found


def find_wheel(dist: Dist, python: Interpreter, files: Iterable[Path]) -> Path | None:
    for path in files:
        wheel = parse_wheel_name(path.name)
        if (wheel and canonical_name(wheel.name) == dist.key and same_version(wheel.version, dist.version)
                and suits(wheel, python)):
            return path
    return None


def source_dir(direct_url_json: str | None) -> Path | None:
    """PEP 610: the local source dir of a `pip install [-e] <dir>`; None for an index install."""
    try:
        info = json.loads(direct_url_json or "{}")
    except ValueError:
        return None
    url = info.get("url", "") if "dir_info" in info else ""
    if not url.startswith("file://"):
        return None
    return Path(unquote(urlparse(url).path))


def build_argv(source: Path, dest: Path, *, python: str = sys.executable) -> list[str]:
    """pip builds deepfleet's wheel from its source, offline (the head has setuptools already)."""
    return [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
            "--wheel-dir", str(dest), str(source)]


def download_argv(dist: Dist, dest: Path, host_python: Interpreter, head_python: Interpreter, *,
                  python: str = sys.executable) -> list[str]:
    """pip fetches the one file on the head; for a host with another python, that python's wheel."""
    argv = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--dest", str(dest)]
    if host_python.major_minor != head_python.major_minor:
        argv += ["--python-version", host_python.major_minor]
    if host_python.machine != head_python.machine:
        argv += ["--platform", f"manylinux2014_{host_python.machine}"]
    return argv + [dist.pin]


def choose_source(dist: Dist, python: Interpreter, head_python: Interpreter, *, files: list[Path],
                  source: Path | None, build_dir: Path, download_dest: Path) -> WheelSource:
    """The first way that needs nothing run: an existing file; else a build (of a copy of the
    source in build_dir/src: an old build/ dir in the source would leak stale files into the
    wheel); else a download."""
    if source is not None:   # a source install's version says nothing about its code: always build
        return WheelSource(dist=dist, kind="build", source=source,
                           command=tuple(build_argv(build_dir / "src", build_dir / "wheels")))
    found = find_wheel(dist, python, files)
    if found:
        return WheelSource(dist=dist, kind="file", path=found, size=os.path.getsize(found))
    return WheelSource(dist=dist, kind="download",
                       command=tuple(download_argv(dist, download_dest, python, head_python)))
