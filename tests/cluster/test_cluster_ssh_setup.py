"""ssh-setup on the namespace cluster: key, accept-new host keys, full mesh, idempotent, password host."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

pytestmark = pytest.mark.cluster


def digest(paths) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() if p.exists() else b"-" for p in paths)).hexdigest()


def ssh_with_new_key_only(cluster, source: str, target: str) -> subprocess.CompletedProcess:
    """From inside `source`'s namespace, with nothing but the key and known_hosts ssh-setup made."""
    ssh_dir = cluster.user_ssh_dir
    argv = ["ip", "netns", "exec", cluster.host(source).namespace, "ssh", "-F", "none", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(ssh_dir / "id_ed25519"), "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}", "-o", "ConnectTimeout=3",
            f"root@{cluster.host(target).address}", "true"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


def test_ssh_setup_builds_full_mesh_and_second_run_changes_nothing(fault_cluster, deepfleet):
    cluster, names = fault_cluster, ["h1", "h2", "h3"]
    hosts = ",".join(f"root@{cluster.host(n).address}" for n in names)
    args = ["ssh-setup", "--hosts", hosts, "--ssh-dir", str(cluster.user_ssh_dir), "--ssh-config", str(cluster.ssh_config)]
    first = deepfleet(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "created" in first.stdout and "FAIL" not in first.stdout
    assert first.stdout.count("ok") >= 12            # (head + 3 hosts) x 3 targets
    for source in names:                             # both directions, with only deepfleet's key
        for target in names:
            done = ssh_with_new_key_only(cluster, source, target)
            assert done.returncode == 0, f"{source} -> {target}: {done.stderr}"
    files = [cluster.user_ssh_dir / f for f in ("id_ed25519", "id_ed25519.pub", "known_hosts", "authorized_keys")]
    before = digest(files)
    second = deepfleet(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "changed: nothing" in second.stdout
    assert digest(files) == before


def test_ssh_setup_password_host_prints_ssh_copy_id_line(fault_cluster, deepfleet, tmp_path):
    cluster = fault_cluster
    ssh_dir = tmp_path / "ssh"
    address = cluster.host("pw").address
    started = time.monotonic()
    wrong_user = f"nosuchuser@{cluster.host('h2').address}"
    done = deepfleet("ssh-setup", "--hosts", f"{cluster.host('h1').address},{address},{wrong_user}", "--user", "root",
                     "--ssh-dir", str(ssh_dir), "--ssh-config", str(cluster.ssh_config))
    assert time.monotonic() - started < 30            # BatchMode: no prompt, no hang
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: host {address}: needs a password")
    assert f"ssh-copy-id -i {ssh_dir}/id_ed25519.pub root@{address}" in lines[0]
    assert lines[1].startswith(f"error: host {cluster.host('h2').address}: key not accepted for user 'nosuchuser'")
    assert f"ssh-copy-id -i {ssh_dir}/id_ed25519.pub {wrong_user}" in lines[1]
