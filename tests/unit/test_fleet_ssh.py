import asyncio
import shlex
import subprocess
import time

import pytest

from deepfleet.fleet.inventory import Host
from deepfleet.fleet.ssh import (SshOptions, diagnose, host_argv, run_argv, run_on_hosts, ssh_argv,
                                  ssh_copy_id_line)

HOST = Host(name="gpu1", address="10.0.0.5", user="ubuntu", port=2222)


def test_ssh_argv_is_batch_strict_multiplexed_and_quotes_the_remote_command():
    options = SshOptions(config_file="/etc/df/ssh_config", identity_file="/k/id", known_hosts_file="/k/known",
                         connect_timeout=4, control_dir="/run/df")
    remote = ["python", "-c", "print('hi $USER')", "$(reboot)", "a b;c"]
    argv = ssh_argv(HOST, remote, options=options)
    text = " ".join(argv)
    assert argv[:3] == ["ssh", "-F", "/etc/df/ssh_config"]
    for option in ("BatchMode=yes", "ConnectTimeout=4", "StrictHostKeyChecking=yes", "ControlMaster=auto",
                   "ControlPath=/run/df/%C", "ControlPersist=60", "UserKnownHostsFile=/k/known"):
        assert option in argv
    assert "StrictHostKeyChecking=no" not in text
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "ubuntu"
    assert argv[-3:-1] == ["--", "10.0.0.5"]
    assert shlex.split(argv[-1]) == remote        # the remote shell gets back exactly these words


def test_reachability_hops_skip_only_the_costly_post_quantum_key_exchange():
    from deepfleet.fleet.doctor import hop_argv
    hop = hop_argv(HOST, SshOptions(control_dir="/run/df"))
    head = ssh_argv(HOST, ["true"], options=SshOptions(control_dir="/run/df"))
    assert not any("KexAlgorithms" in a for a in head)
    assert not any(a.startswith("Control") for a in hop)
    # ssh itself must accept the option and keep every other default algorithm
    kex = subprocess.run([*hop[:hop.index("--")], "-G", HOST.address], capture_output=True, text=True, check=True)
    chosen = next(line.split()[1] for line in kex.stdout.splitlines() if line.startswith("kexalgorithms "))
    assert "sntrup761" not in chosen and chosen.startswith("curve25519-sha256")


def test_too_long_control_dir_turns_multiplexing_off_instead_of_breaking_ssh():
    argv = ssh_argv(HOST, ["true"], options=SshOptions(control_dir="/tmp/" + "x" * 45))
    assert not any(a.startswith("Control") for a in argv)
    argv = ssh_argv(HOST, ["true"], options=SshOptions(control_dir="/tmp/" + "x" * 39))
    assert "ControlMaster=auto" in argv


def test_ssh_argv_refuses_unsafe_values():
    with pytest.raises(ValueError):
        ssh_argv(Host(name="x", address="x;reboot"), ["true"], options=SshOptions())
    with pytest.raises(ValueError):
        ssh_argv(Host(name="x", address="x", user="a b"), ["true"], options=SshOptions())
    with pytest.raises(ValueError):
        ssh_argv(HOST, ["true"], options=SshOptions(host_key_policy="no"))  # type: ignore[arg-type]
    accept = ssh_argv(HOST, ["true"], options=SshOptions(host_key_policy="accept-new"))
    assert "StrictHostKeyChecking=accept-new" in accept


def test_ssh_copy_id_line():
    assert ssh_copy_id_line(HOST, "/home/me/.ssh/id_ed25519.pub") == \
        "ssh-copy-id -i /home/me/.ssh/id_ed25519.pub -p 2222 ubuntu@10.0.0.5"


@pytest.mark.parametrize("stderr, kind, words", [
    ("ssh: connect to host 10.0.0.5 port 2222: Connection refused", "unreachable", "sshd"),
    ("ubuntu@10.0.0.5: Permission denied (password).", "password", "ssh-copy-id"),
    ("ubuntu@10.0.0.5: Permission denied (publickey).", "auth", "user"),
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.", "host-key-changed",
     "ssh-keygen -R 10.0.0.5"),
    ("No ED25519 host key is known for 10.0.0.5 and you have requested strict checking.\n"
     "Host key verification failed.", "host-key-unknown", "ssh-setup"),
    ("ssh: Could not resolve hostname gpu9: Name or service not known", "dns", "/etc/hosts"),
    ("ssh: connect to host 10.0.0.5 port 22: Connection timed out", "unreachable", "firewall"),
])
def test_diagnose_turns_ssh_stderr_into_a_fix(stderr, kind, words):
    failure = diagnose(HOST, 255, stderr, timed_out=False, options=SshOptions())
    assert failure.kind == kind and words in failure.fix + failure.what


def test_remote_command_failure_is_not_an_ssh_failure():
    assert diagnose(HOST, 1, "Traceback ...", timed_out=False, options=SshOptions()) is None
    assert diagnose(HOST, None, "", timed_out=True, options=SshOptions()).kind == "timeout"


def test_timeout_kills_the_process_group_quickly():
    started = time.monotonic()
    code, _, _, timed_out = asyncio.run(run_argv(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3))
    assert timed_out and code is None and time.monotonic() - started < 3


def test_hosts_run_in_parallel_with_stdin():
    hosts = [Host(name=f"l{i}", address="localhost", local=True) for i in range(4)]
    started = time.monotonic()
    results = asyncio.run(run_on_hosts(hosts, ["sh", "-c", "sleep 0.5; cat"], options=SshOptions(), timeout=5,
                                       stdin=lambda h: h.name.encode()))
    assert time.monotonic() - started < 1.8
    assert [r.stdout for r in results] == ["l0", "l1", "l2", "l3"] and all(r.ok for r in results)


def test_a_node_of_the_allocation_is_reached_by_srun_with_the_argv_unquoted():
    node = Host(name="gpu07", address="gpu07", via_srun=True)
    argv = host_argv(node, ["python", "-c", "print('a b')"], options=SshOptions())
    assert argv == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu07", "--overlap", "--quiet",
                    "--kill-on-bad-exit=1", "--", "python", "-c", "print('a b')"]
    with pytest.raises(ValueError, match="starts with '-'"):
        host_argv(Host(name="-x", address="-x", via_srun=True), ["true"], options=SshOptions())
    assert host_argv(Host(name="me", address="localhost", local=True), ["true"], options=SshOptions()) == ["true"]
