"""`deepfleet env check | sync` on a real 2-host namespace cluster, with nothing downloaded.

The head is a throwaway venv (the test's own venv stays untouched): it sees this venv's packages
through a .pth line, has deepfleet as an editable install of the code under test, and `dfdemo`
2.0. h1 runs that same python. h2's python is a venv in h2's private tmpfs (so it exists on h2
only), with dfdemo 1.0 and an old deepfleet 0.0.1 in front of the shared packages. `env sync`
must build deepfleet's wheel, ship both wheels over ssh and install them with --no-index.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

import deepfleet
from namespace_cluster import HostSpec

pytestmark = pytest.mark.cluster

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
SOURCE_ROOT = Path(deepfleet.__file__).resolve().parents[2]      # the checkout under test
SITE = sysconfig.get_paths()["purelib"]                          # this venv's site-packages


def write_wheel(directory: Path, name: str, version: str, module: str | None = None) -> Path:
    """A minimal pure-python wheel, as `pip wheel` of a one-module project would make."""
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if module:
        files[f"{module}.py"] = f"VERSION = {version!r}\n"
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def make_venv(path: Path, shared_site: str, extra_paths: tuple[str, ...] = ()) -> Path:
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # After the venv's own site-packages: what the venv installs itself wins, as on a real host.
    Path(site, "zz_shared.pth").write_text("\n".join([*extra_paths, shared_site]) + "\n")
    return python


def pip_install(python: Path | str, *wheels: Path) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", *map(str, wheels)], check=True, timeout=120)


@pytest.fixture(scope="module")
def env_cluster(cluster_factory):
    private = f"/tmp/dfenv-{secrets.token_hex(3)}"
    cluster = cluster_factory([HostSpec(name="h1"), HostSpec(name="h2", private_dirs=(private,))])
    root = cluster.root / "env"
    wheels, shipped = root / "wheels", root / "wheel-dir"
    for directory in (wheels, shipped):
        directory.mkdir(parents=True)
    old = [write_wheel(wheels, "dfdemo", "1.0", "dfdemo"), write_wheel(wheels, "deepfleet", "0.0.1")]
    new = write_wheel(shipped, "dfdemo", "2.0", "dfdemo")
    head = make_venv(root / "head", SITE, (str(SOURCE_ROOT / "src"),))
    pip_install(head, new)
    # deepfleet as an editable install of this checkout: its metadata, pointing at SOURCE_ROOT.
    info = Path(subprocess.run([str(head), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()) / "deepfleet-0.1.0.dist-info"
    shutil.copytree(Path(SITE) / "deepfleet-0.1.0.dist-info", info)
    (info / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True},
                                                      "url": SOURCE_ROOT.as_uri()}))
    ssh = ["ssh", "-F", str(cluster.ssh_config), cluster.host("h2").address]
    h2_python = f"{private}/venv/bin/python"
    setup = (f"{BASE_PYTHON} -m venv --without-pip {private}/venv && "
             f"echo {SITE} > $({h2_python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/zz.pth"
             f" && {h2_python} -m pip install -q --no-index --no-deps --disable-pip-version-check "
             + " ".join(map(str, old)))
    subprocess.run([*ssh, setup], check=True, timeout=120)
    assert not Path(h2_python).exists()      # h2's python is h2's alone
    fleet = root / "fleet.yaml"
    fleet.write_text(
        f"python: {head}\nssh: {{config_file: {cluster.ssh_config}, connect_timeout: 3}}\n"
        f"defaults: {{user: root, slots: 1}}\nhosts:\n"
        f"  - {{name: h1, address: {cluster.host('h1').address}}}\n"
        f"  - {{name: h2, address: {cluster.host('h2').address}, python: {h2_python}}}\n")
    system = root / "system.yaml"
    system.write_text(fleet.read_text().replace(f"python: {h2_python}", f"python: {BASE_PYTHON}"))
    return {"cluster": cluster, "head": head, "fleet": fleet, "system": system, "wheel_dir": shipped}


@pytest.fixture
def head_cli(env_cluster):
    """The real `deepfleet` entry, run by the head venv's python in a short throwaway HOME."""
    home = tempfile.mkdtemp(prefix="dfe", dir="/tmp")
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XDG_RUNTIME_DIR")}
    environment["HOME"] = home

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(env_cluster["head"]), "-m", "deepfleet.cli.app", *args], cwd=home,
                              env=environment, capture_output=True, text=True, timeout=180)
    yield run
    shutil.rmtree(home, ignore_errors=True)


def test_env_check_sync_check_and_doctor(env_cluster, head_cli):
    started = time.monotonic()
    fleet = str(env_cluster["fleet"])
    check = head_cli("env", "check", "--fleet", fleet, "--package", "dfdemo")
    assert check.returncode == 1, check.stdout + check.stderr
    rows = [line for line in check.stdout.splitlines() if line.startswith("│")]
    assert any("h2" in r and "dfdemo" in r and "2.0" in r and "1.0" in r for r in rows), check.stdout
    assert any("h2" in r and "deepfleet" in r and "0.0.1" in r for r in rows), check.stdout
    assert not any("h1" in r for r in rows) and "2 difference(s) on 1 host(s)" in check.stdout

    plan = head_cli("env", "sync", "--fleet", fleet, "--package", "dfdemo", "--wheel-dir",
                    str(env_cluster["wheel_dir"]), "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "install dfdemo==2.0 from " + str(env_cluster["wheel_dir"] / "dfdemo-2.0-py3-none-any.whl") in plan.stdout
    assert f"install deepfleet==0.1.0 from build from {SOURCE_ROOT}: " in plan.stdout
    assert "h1 (" not in plan.stdout
    assert head_cli("env", "check", "--fleet", fleet, "--package", "dfdemo").returncode == 1   # nothing changed

    doctor = head_cli("doctor", "--fleet", fleet, "--json", "--no-network", "--no-matrix")
    findings = json.loads(doctor.stdout)["findings"]
    assert [f for f in findings if f["check"] == "versions" and "deepfleet" in f["message"] and f["severity"] == "fail"]

    sync = head_cli("env", "sync", "--fleet", fleet, "--package", "dfdemo", "--wheel-dir",
                    str(env_cluster["wheel_dir"]))
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert "h2: installed dfdemo==2.0, deepfleet==0.1.0" in sync.stdout or \
        "h2: installed deepfleet==0.1.0, dfdemo==2.0" in sync.stdout, sync.stdout
    assert "2 host(s) match the head" in sync.stdout

    check = head_cli("env", "check", "--fleet", fleet, "--package", "dfdemo")
    assert check.returncode == 0 and "2 host(s) match the head" in check.stdout, check.stdout + check.stderr
    doctor = head_cli("doctor", "--fleet", fleet, "--json", "--no-network", "--no-matrix")
    findings = json.loads(doctor.stdout)["findings"]
    assert not [f for f in findings if f["check"] == "versions" and f["severity"] != "ok"], findings
    assert any(f["message"] == "deepfleet 0.1.0 everywhere" for f in findings)
    assert time.monotonic() - started < 60


def test_env_sync_refuses_the_system_python(env_cluster, head_cli):
    done = head_cli("env", "sync", "--fleet", str(env_cluster["system"]), "--package", "dfdemo", "--wheel-dir",
                    str(env_cluster["wheel_dir"]))
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith(f"error: h2: {BASE_PYTHON} is the system python (not a venv or conda env)")
    assert "--allow-system-python" in done.stderr and len(done.stderr.splitlines()) == 1
