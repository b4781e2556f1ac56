"""doctor, hosts and hostfile --discover on the real namespace cluster, healthy and with faults."""

from __future__ import annotations

import json
import asyncio
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster_support import FAKE_DEEPSPEED_VERSION, skip_or_fail
from namespace_cluster import HostSpec, firewall_tool, fleet_for, fleet_yaml_text

from deepfleet.fleet.doctor import DoctorOptions, run_doctor
from deepfleet.fleet.ssh import SshOptions, run_on_hosts

pytestmark = pytest.mark.cluster


def write_fleet(cluster, names: list[str], name: str, **kwargs) -> Path:
    path = cluster.root / name
    path.write_text(fleet_yaml_text(cluster, names, **kwargs))
    return path


def doctor(cluster, names: list[str], **options):
    fleet = fleet_for(cluster, names)
    ssh = SshOptions(config_file=str(cluster.ssh_config), connect_timeout=3, control_dir=str(cluster.control_dir))
    return run_doctor(fleet, DoctorOptions(output_dir=str(cluster.root), **options), ssh)


def by(report, check: str, host: str | None = None):
    return [f for f in report.findings if f.check == check and (host is None or f.host == host)]


def test_doctor_cli_healthy_hosts_all_pass(fault_cluster, deepfleet):
    fleet = write_fleet(fault_cluster, ["h1", "h2", "h3"], "healthy.yaml")
    done = deepfleet("doctor", "--fleet", str(fleet), "--json", "--output-dir", str(fault_cluster.root))
    assert done.returncode == 0, done.stdout + done.stderr
    findings = json.loads(done.stdout)["findings"]
    assert not [f for f in findings if f["severity"] == "fail"]
    messages = " | ".join(f["message"] for f in findings)
    assert "all 6 host->host ssh pairs work" in messages
    assert "NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0" in messages
    assert "is shared" in messages
    assert "every host reaches h1:29500" in messages
    assert "deepspeed 0.19.8 everywhere" in messages
    bandwidth = [f["message"] for f in findings if f["check"] == "bandwidth"]
    assert len(bandwidth) == 3
    assert all(("(iperf3," if shutil.which("iperf3") else "(builtin,") in m for m in bandwidth), bandwidth


def test_doctor_reports_every_fault_within_its_timeout(fault_cluster):
    started = time.monotonic()
    report = doctor(fault_cluster, ["h1", "down", "oldds", "far", "pw"], network_seconds=3)
    assert time.monotonic() - started < 40
    assert report.failed
    down = by(report, "ssh", "down")[0]
    assert down.severity == "fail" and "connection refused" in down.message and "sshd" in down.fix
    password = by(report, "ssh", "pw")[0]
    assert password.severity == "fail" and "password" in password.message
    deepspeed = [f for f in by(report, "versions", "oldds") if f.severity == "fail"]
    assert deepspeed and f"deepspeed {FAKE_DEEPSPEED_VERSION} here, 0.19" in deepspeed[0].message
    assert "pip install deepspeed==0.19" in deepspeed[0].fix
    assert not [f for f in by(report, "versions") if f.severity == "fail" and f.host != "oldds"]
    far = by(report, "interface", "far")
    assert far and far[0].severity == "fail" and "no address in" in far[0].message
    matrix = [f.message for f in by(report, "ssh-matrix")]
    assert any("h1" in m.split(" -> ")[0].split(", ") and " -> far: " in m for m in matrix), matrix
    assert any(m.startswith("far -> h1: ") for m in matrix), matrix
    assert not any(" -> down: " in m or " -> pw: " in m for m in matrix)   # already the ssh check's findings
    assert [f for f in by(report, "master-port", "far") if f.severity == "fail"]


def test_doctor_blocked_master_port(fault_cluster):
    if not firewall_tool():
        skip_or_fail("neither nft nor iptables installed (scripts/install-os-deps.sh)")
    report = doctor(fault_cluster, ["fw", "h2"], matrix=False, network_seconds=2, iperf3=False)
    failures = [f for f in by(report, "master-port") if f.severity == "fail"]
    assert {f.host for f in failures} == {"fw", "h2"}
    assert all("timed out" in f.message and "29500" in f.fix for f in failures)
    assert not [f for f in report.findings if f.severity == "fail" and f.check != "master-port"]
    bandwidth = [f.message for f in by(report, "bandwidth")]
    assert len(bandwidth) == 2 and all("(builtin," in m for m in bandwidth)    # other ports still open


def test_hosts_and_hostfile_discover(fault_cluster, deepfleet, tmp_path):
    fleet = write_fleet(fault_cluster, ["h1", "h2"], "two.yaml", slots=2)
    shown = deepfleet("hosts", "--fleet", str(fleet), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [h["name"] for h in json.loads(shown.stdout)["hosts"]] == ["h1", "h2"]
    out = tmp_path / "hostfile"
    done = deepfleet("hostfile", "--discover", "--fleet", str(fleet), "-o", str(out))
    assert done.returncode == 0, done.stderr
    h1, h2 = fault_cluster.host("h1").address, fault_cluster.host("h2").address
    assert out.read_text() == f"{h1} slots=2\n{h2} slots=2\n"   # CPU hosts keep their configured slots


def test_unreachable_host_and_wrong_user_are_one_line_exit_2(fault_cluster, deepfleet):
    fleet = write_fleet(fault_cluster, ["h1", "down"], "down.yaml")
    done = deepfleet("hostfile", "--discover", "--fleet", str(fleet))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: host down: cannot reach") and "connection refused" in lines[0]
    fleet = write_fleet(fault_cluster, ["h1"], "user.yaml", user="nosuchuser")
    done = deepfleet("hostfile", "--discover", "--fleet", str(fleet))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: host h1: cannot reach nosuchuser@") and "'nosuchuser'" in done.stderr


def test_changed_host_key_is_an_error_that_says_what_to_do(fault_cluster, tmp_path):
    known = tmp_path / "known_hosts"
    address = fault_cluster.host("h3").address
    wrong_key = (fault_cluster.root / "h1" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known.write_text(f"{address} {' '.join(wrong_key)}\n")
    ssh = SshOptions(config_file=str(fault_cluster.ssh_config), known_hosts_file=str(known), connect_timeout=3)
    report = run_doctor(fleet_for(fault_cluster, ["h3"]), DoctorOptions(network=False), ssh)
    finding = by(report, "ssh", "h3")[0]
    assert finding.severity == "fail" and "CHANGED" in finding.message
    assert f"ssh-keygen -R {address}" in finding.fix


def test_connections_are_multiplexed(fault_cluster):
    control = fault_cluster.root / "cm-mux"
    ssh = SshOptions(config_file=str(fault_cluster.ssh_config), connect_timeout=3, control_dir=str(control),
                     control_persist_seconds=5)
    hosts = fleet_for(fault_cluster, ["h1", "h2"]).hosts
    first = asyncio.run(run_on_hosts(hosts, ["true"], options=ssh, timeout=20))
    second = asyncio.run(run_on_hosts(hosts, ["true"], options=ssh, timeout=20))
    assert all(r.ok for r in first + second)
    for host in hosts:
        check = subprocess.run(["ssh", "-F", str(fault_cluster.ssh_config), "-o", f"ControlPath={control}/%C",
                                "-O", "check", f"root@{host.address}"], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0 and "Master running" in check.stderr, check.stderr
        subprocess.run(["ssh", "-F", str(fault_cluster.ssh_config), "-o", f"ControlPath={control}/%C",
                        "-O", "exit", f"root@{host.address}"], capture_output=True, timeout=10)


def write_on_host(cluster, name: str, path: Path, data: bytes) -> None:
    """Write a file as host `name` sees it: inside its sshd's mount namespace (its private dirs)."""
    sshd = cluster.host(name).sshd_pid_file.read_text().strip()
    script = f"mkdir -p {shlex.quote(str(path.parent))} && cat > {shlex.quote(str(path))}"
    subprocess.run(["nsenter", "-t", sshd, "-m", "sh", "-c", script], input=data, check=True, timeout=10)


def test_model_dir_on_hosts_without_shared_storage_is_compared_file_by_file(cluster_factory, tmp_path):
    private = tmp_path / "node-local"
    cluster = cluster_factory([HostSpec(name=n, private_dirs=(str(private),)) for n in ("h1", "h2")])
    model = private / "model"
    weights = bytes(range(256)) * 4096
    for name in ("h1", "h2"):
        write_on_host(cluster, name, model / "config.json", b'{"model_type": "llama"}')
        write_on_host(cluster, name, model / "shards" / "model-1.safetensors", weights)
    write_on_host(cluster, "h2", model / "shards" / "model-2.safetensors", b"only here")
    report = doctor(cluster, ["h1", "h2"], checksum_paths=(str(model),), matrix=False, network=False)
    assert [(f.host, f.severity, f.message) for f in by(report, "data")] == [
        ("h2", "fail", f"{model} differs from h1's: 1 extra: shards/model-2.safetensors")]
    write_on_host(cluster, "h1", model / "shards" / "model-2.safetensors", b"only here")
    report = doctor(cluster, ["h1", "h2"], checksum_paths=(str(model),), matrix=False, network=False)
    assert [f.message for f in by(report, "data")] == [
        f"{model} identical on all hosts (3 file(s), {len(weights) + 23 + 9:,} bytes)"]
