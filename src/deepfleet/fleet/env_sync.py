"""`deepfleet env check | sync`: read every host's package versions, plan and run the installs.

One ssh round trip per host reads its versions (all hosts at once). `sync` then gets each
needed wheel onto the head (file, build or download: wheel_sources.py), streams each host's
wheels as one tar on ssh stdin into a temp dir there, and runs pip with --no-index in that
host's python. Only venvs (or conda envs) are written to unless the caller allows the system
python: a system python is shared by the OS and every user.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import json
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.package_sets import (ROOT_DISTRIBUTION, Difference, InstalledDist, Lookup, PackageSet,
                                          compare, cpu_torch_over_gpu_torch, requirement_closure)
from deepfleet.fleet.ssh import SshOptions, run_on_hosts
from deepfleet.fleet.wheel_sources import (DOWNLOAD_CACHE, PIP_WHEEL_CACHE, Interpreter, WheelSource,
                                           choose_source, source_dir, wheel_files)

READ_TIMEOUT = 60.0
EXIT_INSTALL_FAILED = 1


def installed_dist(name: str) -> InstalledDist | None:
    """The head's own metadata of one distribution (the one `import` would load first)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    return InstalledDist(name=dist.metadata["Name"], version=dist.version, requires=tuple(dist.requires or ()),
                         extras=tuple(dist.metadata.get_all("Provides-Extra") or ()))


def head_package_set(extra: Sequence[str] = (), lookup: Lookup = installed_dist) -> PackageSet:
    if lookup(ROOT_DISTRIBUTION) is None:   # run from a source tree on PYTHONPATH: no metadata to follow
        raise DeepfleetError("deepfleet is not installed in the head's python", where="env",
                             fix="install it there (`pip install -e <source dir>` for a checkout)")
    not_here = [name for name in extra if lookup(name) is None]
    if not_here:
        raise DeepfleetError(f"{', '.join(not_here)} not installed on the head", where="--package",
                             fix="name a distribution installed in the head's python (see `pip list`)")
    found, _ = requirement_closure([ROOT_DISTRIBUTION, *extra], lookup)
    return found


def head_interpreter() -> Interpreter:
    return Interpreter(version=platform.python_version(), machine=platform.machine())


@dataclass(frozen=True, kw_only=True)
class HostEnv:
    """One host's python as it reported itself."""

    host: Host
    python: str                        # the fleet's python for this host
    interpreter: Interpreter
    system: bool                       # no venv and no conda env: the OS's python
    has_pip: bool
    versions: dict[str, str | None]


def remote_source() -> str:
    return resources.files("deepfleet.fleet").joinpath("remote_env.py").read_text()


def report_argv(python: str) -> list[str]:
    return [python, "-"]


def report_stdin(names: Sequence[str]) -> bytes:
    return (remote_source() + f"\nreport(json.loads({json.dumps({'names': list(names)})!r}))\n").encode()


def install_argv(python: str, pins: Sequence[str]) -> list[str]:
    """The install program travels as `-c` (stdin carries the wheels); ssh_argv quotes every word."""
    return [python, "-c", remote_source(), json.dumps({"requirements": list(pins)})]


def host_env_from(host: Host, python: str, answer: dict) -> HostEnv:
    return HostEnv(host=host, python=python,
                   interpreter=Interpreter(version=answer["python_version"], machine=answer["machine"]),
                   system=answer["prefix"] == answer["base_prefix"] and not answer["conda"],
                   has_pip=answer["pip"], versions=answer["versions"])


def last_json(text: str) -> dict | None:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def read_hosts(fleet: Fleet, options: SshOptions, names: Sequence[str]) -> tuple[list[HostEnv], list[Problem]]:
    """Every host's versions of `names`, in one parallel round trip."""
    results = asyncio.run(run_on_hosts(fleet.hosts, lambda h: report_argv(fleet.python_for(h)), options=options,
                                       timeout=options.connect_timeout + READ_TIMEOUT, stdin=report_stdin(names)))
    envs, problems = [], []
    for result in results:
        python, answer = fleet.python_for(result.host), last_json(result.stdout)
        if result.failure:
            problems.append(Problem(what=result.failure.what, where=result.host.name, fix=result.failure.fix))
        elif result.returncode == 127 or (answer is None and "No such file" in result.stderr):
            problems.append(Problem(what=f"python {python} not found", where=result.host.name,
                                    fix="create the venv there, or set this host's `python:` in fleet.yaml"))
        elif not result.ok or answer is None:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
            problems.append(Problem(what=f"{python} failed (exit {result.returncode}): {tail}",
                                    where=result.host.name, fix="run that python by hand on the host"))
        else:
            envs.append(host_env_from(result.host, python, answer))
    return envs, problems


@dataclass(frozen=True, kw_only=True)
class EnvCheck:
    head: PackageSet
    hosts: list[HostEnv]
    differences: list[Difference]
    problems: list[Problem] = field(default_factory=list)    # hosts that could not be read


def check_fleet(fleet: Fleet, options: SshOptions, head: PackageSet) -> EnvCheck:
    envs, problems = read_hosts(fleet, options, [d.name for d in head.values()])
    differences = [d for env in envs for d in compare(env.host.name, head, env.versions)]
    return EnvCheck(head=head, hosts=envs, differences=differences, problems=problems)


@dataclass(frozen=True, kw_only=True)
class HostPlan:
    env: HostEnv
    installs: tuple[WheelSource, ...]
    skipped: tuple[tuple[Difference, str], ...] = ()          # (difference, why it is left alone)


@dataclass(frozen=True, kw_only=True)
class SyncSetup:
    """Where wheels come from on the head; also what makes planning pure."""

    files: list[Path]                  # candidate wheel files, searched in order
    sources: dict[str, Path]           # canonical name -> source dir of a source install
    head_python: Interpreter
    build_dir: Path
    download_dest: Path


def plan_sync(check: EnvCheck, setup: SyncSetup) -> list[HostPlan]:
    plans = []
    for env in check.hosts:
        installs, skipped = [], []
        for difference in (d for d in check.differences if d.host == env.host.name):
            if cpu_torch_over_gpu_torch(difference):
                skipped.append((difference, f"the head's CPU build would replace this host's {difference.found}; "
                                            f"install torch=={difference.found.partition('+')[0]} for its CUDA "
                                            "by hand, or run env sync from a GPU host"))
                continue
            installs.append(choose_source(difference.dist, env.interpreter, setup.head_python, files=setup.files,
                                          source=setup.sources.get(difference.dist.key),
                                          build_dir=setup.build_dir, download_dest=setup.download_dest))
        if installs or skipped:
            plans.append(HostPlan(env=env, installs=tuple(installs), skipped=tuple(skipped)))
    return plans


def system_python_problems(plans: Sequence[HostPlan], *, allow: bool) -> list[Problem]:
    """A host whose python is the OS's own is written to only when the user says so."""
    problems = []
    for plan in plans:
        if plan.installs and not plan.env.has_pip:
            problems.append(Problem(what=f"{plan.env.python} has no pip", where=plan.env.host.name,
                                    fix=f"run `{plan.env.python} -m ensurepip` on that host"))
        if plan.installs and plan.env.system and not allow:
            problems.append(Problem(what=f"{plan.env.python} is the system python (not a venv or conda env)",
                                    where=plan.env.host.name,
                                    fix="point the fleet's `python:` at a venv on that host, or pass "
                                        "--allow-system-python to install into it anyway"))
    return problems


def sync_setup(wheel_dirs: Sequence[Path], head: PackageSet, work_dir: Path) -> SyncSetup:
    sources = {}
    for key, dist in head.items():
        try:
            found = source_dir(metadata.distribution(dist.name).read_text("direct_url.json"))
        except metadata.PackageNotFoundError:
            found = None
        if found is not None:
            sources[key] = found
    return SyncSetup(files=wheel_files([*wheel_dirs, DOWNLOAD_CACHE, PIP_WHEEL_CACHE]), sources=sources,
                     head_python=head_interpreter(), build_dir=work_dir / "build",
                     download_dest=DOWNLOAD_CACHE.expanduser())
