"""Namespace cluster fixtures (see namespace_cluster.py), built once per session, always torn down.

- `namespace_cluster`: N healthy hosts h1..hN (N=2; parametrize indirectly or set
  DEEPFLEET_TEST_HOSTS for more). Yields a `Cluster`: addresses, namespaces, veths, ssh_config,
  key and known_hosts paths.
- `cluster_factory`: build any list of `HostSpec`s; everything built is torn down at session end.
- `fault_cluster`: healthy h1-h3 plus one host per fault (no sshd, other deepspeed, other subnet,
  firewalled master port, password only).
- `slurm_cluster`: a real SLURM (slurm_cluster.py) on its own namespace cluster of nodes n1..nN
  (N=2, or DEEPFLEET_SLURM_NODES): munged + slurmctld on the head, one slurmd per host. Yields a
  `SlurmCluster`: `nodes` (name, address), `env` (SLURM_CONF, PATH), `run(argv)` for srun/sbatch/
  squeue/scancel/scontrol, `cluster` (the namespace Cluster: ssh still works). Stopped and checked
  gone at session end.
- `deepfleet`: run the real CLI entry in-process -> CompletedProcess(returncode, stdout, stderr),
  with HOME (where ssh ControlMaster sockets go) in a short temp dir.

Missing prerequisites skip these tests with the reason, or fail them when CI=true.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster_support import FAKE_DEEPSPEED_VERSION, skip_or_fail  # noqa: E402
from namespace_cluster import (Cluster, HostSpec, build_cluster, firewall_port,  # noqa: E402
                               firewall_tool, missing_prerequisites, teardown_cluster)
from slurm_cluster import SlurmCluster, missing_slurm_prerequisites, start_slurm, stop_slurm  # noqa: E402

FAULT_HOSTS = [
    HostSpec(name="h1"), HostSpec(name="h2"), HostSpec(name="h3"),
    HostSpec(name="down", sshd=False),
    HostSpec(name="oldds", sshd_options=("SetEnv PYTHONPATH={root}/shim",)),
    HostSpec(name="far", other_subnet=True),
    HostSpec(name="fw"),
    HostSpec(name="pw", password_only=True),
]


def require_cluster_prerequisites() -> None:
    reason = missing_prerequisites()
    if reason is not None:
        skip_or_fail(reason)


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="session")
def cluster_factory():
    require_cluster_prerequisites()
    built: list[Cluster] = []

    def build(specs: list[HostSpec] | int) -> Cluster:
        cluster = build_cluster(specs)
        built.append(cluster)
        return cluster

    yield build
    leftovers = [name for cluster in built for name in teardown_cluster(cluster)]
    # Only this session's prefixes: other sessions on the machine may have clusters of their own.
    stray = sorted(n for n in _netns_names() for c in built if n.startswith(f"{c.prefix}-"))
    assert not leftovers and not stray, f"namespace cluster left behind: {leftovers} {stray}"


@pytest.fixture(scope="session")
def namespace_cluster(request, cluster_factory) -> Cluster:
    count = getattr(request, "param", None) or int(os.environ.get("DEEPFLEET_TEST_HOSTS", "2"))
    return cluster_factory(count)


def write_fake_deepspeed(shim: Path, version: str) -> None:
    """A deepspeed package plus dist-info, as `pip install --target` would leave it."""
    package, info = shim / "deepspeed", shim / f"deepspeed-{version}.dist-info"
    package.mkdir(parents=True)
    info.mkdir()
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {version}\n")


@pytest.fixture(scope="session")
def fault_cluster(cluster_factory) -> Cluster:
    cluster = cluster_factory(FAULT_HOSTS)
    write_fake_deepspeed(cluster.root / "shim", FAKE_DEEPSPEED_VERSION)
    if firewall_tool():
        firewall_port(cluster, "fw", 29500)
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(cluster_factory) -> SlurmCluster:
    reason = missing_slurm_prerequisites()
    if reason is not None:
        skip_or_fail(reason)
    count = int(os.environ.get("DEEPFLEET_SLURM_NODES", "2"))
    slurm = start_slurm(cluster_factory([HostSpec(name=f"n{i + 1}") for i in range(count)]))
    yield slurm
    leftovers = stop_slurm(slurm)
    assert not leftovers, f"SLURM daemons or job processes left behind: {leftovers}"


@pytest.fixture
def deepfleet(monkeypatch):
    from deepfleet.cli.app import main

    home = tempfile.mkdtemp(prefix="dfh", dir="/tmp")   # short: ControlPath sockets live under it
    monkeypatch.setenv("HOME", home)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.chdir(home)

    def run(*args: str) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "argv", ["deepfleet", *args])
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code or 0
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    yield run
    shutil.rmtree(home, ignore_errors=True)
