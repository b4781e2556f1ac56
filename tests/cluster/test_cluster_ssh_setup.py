"""ssh-setup on the namespace cluster: key, accept-new host keys, full mesh, idempotent, password host, and the
key and known_hosts a user's ssh config names."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from namespace_cluster import HostSpec

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
    changes = first.stdout.split("changed: ", 1)[1].strip().split("; ")
    assert any(c.endswith(": key") for c in changes) and "FAIL" not in first.stdout   # the hosts' key was made
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
    # The key to copy is the one ssh uses for these hosts: the session ssh_config names it (not --ssh-dir's).
    assert f"ssh-copy-id -i {cluster.identity_file}.pub root@{address}" in lines[0]
    assert lines[1].startswith(f"error: host {cluster.host('h2').address}: key not accepted for user 'nosuchuser'")
    assert f"ssh-copy-id -i {cluster.identity_file}.pub {wrong_user}" in lines[1]


def login_with_only(key, known_hosts, address: str) -> subprocess.CompletedProcess:
    """From the head, with nothing but this key and this known_hosts (strict host key checking)."""
    argv = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(key),
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=3",
            f"root@{address}", "true"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


def test_ssh_setup_uses_the_key_and_known_hosts_the_ssh_config_names_so_doctor_works(cluster_factory, deepfleet,
                                                                                      tmp_path):
    # --ssh-dir keeps the hosts' side in the session (the real ~/.ssh is never touched); on the head, the files
    # the ssh config names win over it, as they do for every later ssh.
    names = ["c1", "c2", "c3"]
    cluster = cluster_factory([HostSpec(name=n) for n in names])
    addresses = [cluster.host(n).address for n in names]
    own = tmp_path / "own"
    key, known_hosts = own / "keys" / "cluster_key", own / "cluster_known_hosts"
    config = tmp_path / "ssh_config"
    # The first IdentityFile is new; the second (the session key, already authorized: a password or an admin's
    # key in real life) is how the first login gets in.
    config.write_text(f"Host {' '.join(addresses)}\n  IdentityFile {key}\n  IdentityFile {cluster.identity_file}\n"
                      f"  UserKnownHostsFile {known_hosts} {own}/other_known_hosts\n  User root\n")
    setup = deepfleet("ssh-setup", "--hosts", ",".join(addresses), "--ssh-config", str(config),
                      "--ssh-dir", str(cluster.user_ssh_dir))
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"head: created {key};" in setup.stdout and f"learned host keys into {known_hosts}" in setup.stdout
    for address in addresses:
        done = login_with_only(key, known_hosts, address)
        assert done.returncode == 0, f"{address}: {done.stderr}"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"defaults: {{slots: 1}}\nssh: {{config_file: {config}, connect_timeout: 3}}\nhosts:\n"
                     + "".join(f"  - {{name: {n}, address: {a}}}\n" for n, a in zip(names, addresses)))
    doctor = deepfleet("doctor", "--fleet", str(fleet), "--output-dir", str(cluster.root))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "0 fail" in doctor.stdout
