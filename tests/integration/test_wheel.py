"""The package as users install it: a wheel (not the editable checkout) in a fresh venv runs
`deepfleet demo` from an unrelated directory, with the demo recipe it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"   # built from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                 "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel, = (root / "dist").glob("deepfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deepfleet/assets/demo.yaml" in names and "deepfleet/assets/tiny_tokenizer/tokenizer.json" in names
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    clean = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--ignore-installed", str(wheel)], env=clean, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The dependencies come from this test's environment, on PYTHONPATH (no .pth files are read
    # from there, so its editable deepfleet stays out); deepfleet itself is the installed wheel.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "OMP_NUM_THREADS": "1"}
    return venv, env


def test_the_wheel_runs_the_demo_from_any_directory(installed, tmp_path):
    venv, env = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import deepfleet; print(deepfleet.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    deepfleet = str(venv / "bin" / "deepfleet")
    shown = subprocess.run([deepfleet, "demo", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "demo" in shown.stdout, shown.stderr
    done = subprocess.run([deepfleet, "demo", "train.max_steps=3", "logging.every_steps=1", "--heldout", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "exact match before" in done.stdout
    assert (tmp_path / "runs" / "demo" / "final" / "model.safetensors").is_file()
