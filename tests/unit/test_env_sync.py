"""env check | sync, the pure parts: closure, comparison, wheel choice, plan, refusals, argv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepfleet.fleet.env_install import failed_pins, result_problem
from deepfleet.fleet.env_sync import (EnvCheck, HostEnv, SyncSetup, head_package_set, install_argv, plan_sync,
                                      report_stdin, system_python_problems)
from deepfleet.fleet.inventory import Host
from deepfleet.fleet.package_sets import (Dist, InstalledDist, canonical_name, compare, cpu_torch_over_gpu_torch,
                                          requirement_closure)
from deepfleet.fleet.ssh import SshOptions, ssh_argv
from deepfleet.fleet.wheel_sources import (Interpreter, build_argv, choose_source, download_argv, parse_wheel_name,
                                           source_dir, suits)

INSTALLED = {
    "deepfleet": InstalledDist(name="deepfleet", version="0.1.0", extras=("qlora", "dev"),
                               requires=("torch==2.13.0", "Typing_Extensions>=4", "bitsandbytes>=0.45; extra == 'qlora'",
                                         "pytest>=8; extra == 'dev'", "pywin32; sys_platform == 'win32'",
                                         "huggingface-hub[torch]>=1")),
    "torch": InstalledDist(name="torch", version="2.13.0+cpu", requires=("typing-extensions", "sympy")),
    "typing-extensions": InstalledDist(name="typing_extensions", version="4.16.0"),
    "sympy": InstalledDist(name="sympy", version="1.14", requires=("mpmath<1.4",)),
    "mpmath": InstalledDist(name="mpmath", version="1.3.0"),
    "bitsandbytes": InstalledDist(name="bitsandbytes", version="0.45.0"),
    "pytest": InstalledDist(name="pytest", version="8.0"),
    "huggingface-hub": InstalledDist(name="huggingface_hub", version="2.4.0", extras=("torch",),
                                     requires=("filelock", "safetensors; extra == 'torch'")),
    "filelock": InstalledDist(name="filelock", version="4.3.1"),
    "safetensors": InstalledDist(name="safetensors", version="0.8.0", requires=("huggingface-hub[torch]",)),
    "mytrainer": InstalledDist(name="MyTrainer", version="1.0", requires=("mpmath",)),
}


def lookup(name: str) -> InstalledDist | None:
    return INSTALLED.get(canonical_name(name))


HEAD = head_package_set(lookup=lookup)
PY311 = Interpreter(version="3.11.7", machine="x86_64")


def test_closure_follows_requirements_extras_and_installed_root_extras_only():
    assert set(HEAD) == {"deepfleet", "torch", "typing-extensions", "sympy", "mpmath", "bitsandbytes",
                         "huggingface-hub", "filelock", "safetensors"}   # no pytest (dev), no pywin32 (marker)
    assert HEAD["typing-extensions"] == Dist(name="typing_extensions", version="4.16.0")


def test_extra_root_extras_only_when_installed():
    found, _ = requirement_closure(["deepfleet"], lambda n: None if canonical_name(n) == "bitsandbytes" else lookup(n))
    assert "bitsandbytes" not in found


def test_package_option_adds_its_closure_and_rejects_unknown():
    assert {"mytrainer", "mpmath"} <= set(head_package_set(["mytrainer"], lookup=lookup))
    with pytest.raises(Exception) as info:
        head_package_set(["nosuch"], lookup=lookup)
    assert "nosuch not installed on the head" in str(info.value) and "--package" in str(info.value)


@pytest.mark.parametrize("a, b", [("Foo_Bar", "foo-bar"), ("foo.bar", "FOO--bar"), ("typing_extensions",
                                                                                      "Typing-Extensions")])
def test_pep503_names(a, b):
    assert canonical_name(a) == canonical_name(b)


def test_compare_by_pep503_name_and_pep440_version():
    host = {"DeepFleet": "0.1.0", "torch": "2.13.0+cpu", "Typing.Extensions": "4.15", "sympy": "1.14.0",
            "mpmath": "1.3.0", "bitsandbytes": "0.45.0", "huggingface-hub": "2.4.0", "filelock": "4.3.1",
            "safetensors": None}
    differences = compare("h2", HEAD, host)
    assert [(d.dist.name, d.found, d.note) for d in differences] == [
        ("safetensors", None, "not installed"), ("typing_extensions", "4.15", "different version")]


def test_torch_cuda_build_difference_is_named():
    [difference] = [d for d in compare("h2", HEAD, {"torch": "2.13.0+cu124"}) if d.dist.key == "torch"]
    assert difference.note == "CUDA build: +cu124 here, +cpu on the head"
    assert cpu_torch_over_gpu_torch(difference)
    [other] = [d for d in compare("h2", {"torch": Dist(name="torch", version="2.13.0+cu121")},
                                  {"torch": "2.13.0+cu124"})]
    assert not cpu_torch_over_gpu_torch(other)


def test_wheel_names_and_tags():
    wheel = parse_wheel_name("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert wheel.version == "2.13.0+cpu" and suits(wheel, PY311)
    assert not suits(wheel, Interpreter(version="3.10.1", machine="x86_64"))
    assert not suits(wheel, Interpreter(version="3.11.1", machine="aarch64"))
    assert suits(parse_wheel_name("deepfleet-0.1.0-py3-none-any.whl"), PY311)
    assert suits(parse_wheel_name("pydantic_core-2.50.5-cp38-abi3-manylinux_2_17_x86_64.whl"), PY311)
    assert not suits(parse_wheel_name("x-1-cp312-abi3-linux_x86_64.whl"), PY311)
    assert parse_wheel_name("not-a-wheel.tar.gz") is None


def test_source_dir_from_direct_url():
    assert source_dir('{"dir_info": {"editable": true}, "url": "file:///work/my%20src"}') == Path("/work/my src")
    assert source_dir('{"url": "https://x/y.whl", "archive_info": {}}') is None
    assert source_dir(None) is None


def test_argv_builders():
    dist = Dist(name="Foo_Bar", version="2.0")
    assert download_argv(dist, Path("/c"), PY311, PY311, python="py")[-1] == "Foo_Bar==2.0"
    other = download_argv(dist, Path("/c"), Interpreter(version="3.10.2", machine="aarch64"), PY311, python="py")
    assert other[:4] == ["py", "-m", "pip", "download"] and "--no-deps" in other
    assert other[other.index("--python-version") + 1] == "3.10" and "manylinux2014_aarch64" in other
    assert build_argv(Path("/src"), Path("/w"), python="py") == [
        "py", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
        "--wheel-dir", "/w", "/src"]
    argv = install_argv("/opt/venv/bin/python", ["foo==2.0"])
    assert argv[:2] == ["/opt/venv/bin/python", "-c"] and json.loads(argv[3]) == {"requirements": ["foo==2.0"]}
    remote = ssh_argv(Host(name="h", address="h"), argv, options=SshOptions())
    assert "StrictHostKeyChecking=no" not in remote and "StrictHostKeyChecking=yes" in remote


def env(name: str, versions: dict, *, system: bool = False, pip: bool = True, python=PY311) -> HostEnv:
    return HostEnv(host=Host(name=name, address=name), python=f"/{name}/bin/python", interpreter=python,
                   system=system, has_pip=pip, versions=versions)


def setup(tmp_path: Path, files=(), sources=None) -> SyncSetup:
    return SyncSetup(files=list(files), sources=sources or {}, head_python=PY311, build_dir=tmp_path / "b",
                     download_dest=tmp_path / "d")


def checked(*envs: HostEnv, head=None) -> EnvCheck:
    head = head or {"foo": Dist(name="foo", version="2.0"), "deepfleet": Dist(name="deepfleet", version="0.1.0")}
    return EnvCheck(head=head, hosts=list(envs),
                    differences=[d for e in envs for d in compare(e.host.name, head, e.versions)])


def test_plan_uses_files_then_builds_source_installs_then_downloads(tmp_path):
    wheel = tmp_path / "foo-2.0-py3-none-any.whl"
    wheel.write_bytes(b"x" * 1234)
    same = env("h1", {"foo": "2.0", "deepfleet": "0.1.0"})
    stale = env("h2", {"foo": "1.0", "deepfleet": None})
    [plan] = plan_sync(checked(same, stale), setup(tmp_path, [wheel], {"deepfleet": Path("/src/deepfleet")}))
    assert plan.env.host.name == "h2"
    kinds = {s.dist.name: s for s in plan.installs}
    assert kinds["foo"].kind == "file" and kinds["foo"].size == 1234 and "1.2 kB" in kinds["foo"].describe()
    assert kinds["deepfleet"].kind == "build" and kinds["deepfleet"].source == Path("/src/deepfleet")
    [plan] = plan_sync(checked(stale), setup(tmp_path))
    assert {s.dist.name: s.kind for s in plan.installs} == {"foo": "download", "deepfleet": "download"}


def test_plan_skips_cpu_torch_over_gpu_torch(tmp_path):
    head = {"torch": Dist(name="torch", version="2.13.0+cpu")}
    [plan] = plan_sync(checked(env("gpu", {"torch": "2.13.0+cu124"}), head=head), setup(tmp_path))
    assert not plan.installs and "CPU build would replace" in plan.skipped[0][1]


def test_system_python_refused_without_flag(tmp_path):
    plans = plan_sync(checked(env("sys", {"foo": "1.0", "deepfleet": "0.1.0"}, system=True),
                              env("venv", {"foo": "1.0", "deepfleet": "0.1.0"})), setup(tmp_path))
    [problem] = system_python_problems(plans, allow=False)
    assert problem.where == "sys" and "system python" in problem.what and "--allow-system-python" in problem.fix
    assert system_python_problems(plans, allow=True) == []
    nopip = plan_sync(checked(env("np", {"foo": "1.0"}, pip=False)), setup(tmp_path))
    assert "ensurepip" in system_python_problems(nopip, allow=True)[0].fix


def test_install_results_one_line_each():
    ok = json.dumps({"stage": "pip", "returncode": 0, "last_error": ""})
    assert result_problem("h", ["a==1"], 0, ok, "", False) == (None, 0)
    tmp = json.dumps({"stage": "tempdir", "error": "/tmp: Permission denied"})
    problem, code = result_problem("h", ["a==1"], 0, tmp, "", False)
    assert code == 2 and "temp dir: /tmp: Permission denied" in problem.what and "TMPDIR" in problem.fix
    pip = json.dumps({"stage": "pip", "returncode": 1, "last_error": "ERROR: No matching distribution found for Foo_Bar==2.0"})
    problem, code = result_problem("h2", ["deepfleet==0.1.0", "foo-bar==2.0"], 0, pip, "", False)
    assert code == 1 and problem.render().startswith("h2: pip install foo-bar==2.0 failed: ERROR: No matching")
    assert failed_pins(["a==1", "b==2"], "ERROR: something else") == ["a==1", "b==2"]


def test_remote_report_runs_in_a_plain_python(tmp_path):
    done = subprocess.run([sys.executable, "-I", "-"], input=report_stdin(["pip", "No_Such-Thing"]),
                          capture_output=True, timeout=60)
    answer = json.loads(done.stdout.decode().splitlines()[-1])
    assert answer["versions"]["No_Such-Thing"] is None and answer["versions"]["pip"]
    assert answer["prefix"] != answer["base_prefix"] and not answer["conda"]   # the test venv


def run_remote_install(requirements: list[str], before: str = "") -> dict:
    """The host side of `env sync`, run here on an empty tar: pip with --no-index changes nothing."""
    import io
    import tarfile
    from deepfleet.fleet.env_sync import remote_source
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    program = remote_source().replace('if __name__ == "__main__" and len(sys.argv) > 1:', before + "\nif True:")
    done = subprocess.run([sys.executable, "-c", program, json.dumps({"requirements": requirements})],
                          input=empty.getvalue(), capture_output=True, timeout=120)
    return json.loads(done.stdout.decode().splitlines()[-1])


def test_remote_install_reports_pip_last_error():
    answer = run_remote_install(["no-such-dist-xyz==1.0"])
    assert answer["stage"] == "pip" and answer["returncode"] != 0
    assert answer["last_error"].startswith("ERROR: No matching distribution found for no-such-dist-xyz==1.0")


def test_remote_install_reports_an_unwritable_temp_dir():
    answer = run_remote_install(["x==1"], before="tempfile.tempdir = '/proc/self/nope'")
    assert answer["stage"] == "tempdir" and answer["error"].startswith("/proc/self/nope: ")


def test_a_wheel_that_cannot_be_downloaded_names_it_and_wheel_dir(tmp_path):
    from deepfleet.errors import DeepfleetError
    from deepfleet.fleet.env_install import fetch_wheel
    from deepfleet.fleet.env_sync import HostPlan
    from deepfleet.fleet.wheel_sources import WheelSource
    failing = (sys.executable, "-c", "import sys; print('ERROR: No matching distribution found for foo==9'); "
               "sys.exit(1)", "--dest", str(tmp_path))
    source = WheelSource(dist=Dist(name="foo", version="9"), kind="download", command=failing)
    with pytest.raises(DeepfleetError) as info:
        fetch_wheel(source, HostPlan(env=env("h2", {}), installs=(source,)))
    [line] = str(info.value).splitlines()
    assert line.startswith("error: h2: no wheel of foo==9 for python 3.11 (x86_64) could be downloaded: ERROR: No ")
    assert "--wheel-dir DIR" in line and info.value.exit_code == 2


def test_head_without_deepfleet_metadata_is_one_error():
    with pytest.raises(Exception) as info:
        head_package_set(lookup=lambda name: None)
    assert "deepfleet is not installed in the head's python" in str(info.value)
