"""The remote probe run locally (as the head runs it on the local host), plus the network helpers."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from deepfleet.fleet import remote_probe
from deepfleet.fleet.facts import probe_argv, probe_stdin
from deepfleet.fleet.network import BandwidthSink, select_shared_interface, source_address_towards
from deepfleet.fleet.ssh_setup import install_argv


def run_probe(params, timeout=30):
    done = subprocess.run(probe_argv(sys.executable), input=probe_stdin(params), capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def test_probe_collects_versions_without_importing_torch_and_sees_the_token(tmp_path):
    (tmp_path / ".tok").write_text("secret-value")
    facts = run_probe({"python": sys.executable, "workdir": str(tmp_path), "output_dir": str(tmp_path),
                       "share_token": [".tok", "secret-value"], "checksum": [str(tmp_path / ".tok")]})[-1]
    import importlib.metadata
    assert facts["packages"]["deepspeed"]["version"] == importlib.metadata.version("deepspeed")
    assert facts["python"]["wanted_found"] and facts["share_token_seen"] is True
    assert facts["workdir"]["exists"] and facts["accelerators"]["count"] == 0
    assert facts["checksums"][str(tmp_path / ".tok")]["bytes"] == len("secret-value")
    assert any(i["name"] == "lo" for i in facts["interfaces"])
    assert facts["torch_imported"] is False
    assert facts["accelerators"]["vendor"] is None and facts["accelerators"]["memory_bytes"] == []
    assert facts["build"]["deepspeed_ops"]["accelerator"] and facts["build"]["libaio"].keys() == {"header", "library"}
    wrong = run_probe({"python": sys.executable, "output_dir": str(tmp_path), "share_token": [".tok", "other"]})[-1]
    assert wrong["share_token_seen"] is False


def test_probe_imports_neither_torch_nor_deepspeed_without_a_gpu():
    code = ("import sys; from deepfleet.fleet import remote_probe; remote_probe.facts({}); "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_missing_python_falls_back_and_says_so():
    facts = run_probe({"python": "/nonexistent/bin/python"})
    assert facts[-1]["python"]["wanted_found"] is False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listener_and_master_connect_on_loopback():
    port = free_port()
    listener = subprocess.Popen(probe_argv(sys.executable), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    listener.stdin.write(probe_stdin({"mode": "listen", "address": "127.0.0.1", "port": port, "expect": 1,
                                      "seconds": 5}))
    listener.stdin.close()
    try:
        result = remote_probe.connect_master("127.0.0.1", port, deadline=time.monotonic() + 5)
        out = listener.stdout.read().decode().splitlines()
        listener.wait(timeout=10)
    finally:
        listener.kill()
    assert result["ok"] and json.loads(out[0])["ready"] is True and json.loads(out[1])["peers"] == ["127.0.0.1"]
    closed = remote_probe.connect_master("127.0.0.1", free_port(), deadline=time.monotonic() + 0.3)
    assert not closed["ok"] and "refused" in closed["error"].lower()


def test_bandwidth_sink_starts_hosts_together_and_counts_what_they_sent():
    async def scenario():
        sink = BandwidthSink(expected={"a", "b", "dead"}, barrier_seconds=10)
        port = (await sink.start(["127.0.0.1"]))["127.0.0.1"]
        send = remote_probe.send_bandwidth
        first = asyncio.create_task(asyncio.to_thread(send, "127.0.0.1", port, "a", 0.2, 8 << 20, 10))
        await asyncio.sleep(0.3)
        assert not sink.go.is_set() and not first.done()        # waits for b and for dead
        second = asyncio.create_task(asyncio.to_thread(send, "127.0.0.1", port, "b", 0.2, 8 << 20, 10))
        await asyncio.sleep(0.2)
        assert not sink.go.is_set()
        started = time.monotonic()
        sink.host_finished("dead")                                 # its probe ended without saying hello
        results = await asyncio.gather(first, second)
        await sink.close()
        return results, time.monotonic() - started
    results, seconds = asyncio.run(scenario())
    assert seconds < 3
    for result in results:
        assert 0 < result["bytes"] <= 8 << 20 and result["gbit_s"] > 0
        assert result["bytes"] == 8 << 20 or result["seconds"] >= 0.2


def test_shared_interface_selection():
    def iface(name, address, prefix=24):
        return {"name": name, "address": address, "prefix": prefix, "up": True}
    lo = iface("lo", "127.0.0.1", 8)
    choice = select_shared_interface({
        "a": [lo, iface("eth0", "192.168.1.10"), iface("ib0", "10.0.0.1")],
        "b": [lo, iface("ens5", "192.168.1.11"), iface("ib0", "10.0.0.2")],
        "c": [lo, iface("eth0", "192.168.1.12")],
    })
    assert choice.network == "192.168.1.0/24" and choice.per_host == {"a": "eth0", "b": "ens5", "c": "eth0"}
    assert choice.env("b") == {"NCCL_SOCKET_IFNAME": "ens5", "GLOO_SOCKET_IFNAME": "ens5"}
    alone = select_shared_interface({"a": [lo, iface("eth0", "10.1.0.1")], "b": [lo, iface("eth0", "10.2.0.1")]})
    assert alone.network is None and alone.outside == ["a", "b"]
    assert source_address_towards("127.0.0.1") == "127.0.0.1"


def test_install_script_is_idempotent(tmp_path):
    keys = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA1 head\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2 other\n"
    def run():
        return subprocess.run(install_argv(str(tmp_path / "ssh")), input=keys, capture_output=True, text=True,
                              timeout=30).stdout
    first, second = run(), run()
    assert "CHANGED key" in first and first.count("CHANGED authorized_keys") == 2
    assert "CHANGED" not in second and "PUBKEY ssh-ed25519 " in second
    assert (tmp_path / "ssh" / "authorized_keys").read_text() == keys
    assert oct((tmp_path / "ssh").stat().st_mode & 0o777) == "0o700"


def test_install_script_on_hosts_sharing_one_ssh_dir_makes_one_key(tmp_path):
    # An NFS home: every host runs the script at once against the same dir. A slow ssh-keygen (as on a busy
    # host) makes sure they all find no key before the first one is written.
    slow = tmp_path / "bin" / "ssh-keygen"
    slow.parent.mkdir()
    slow.write_text(f"#!/bin/sh\nsleep 0.5\nexec {shutil.which('ssh-keygen')} \"$@\"\n")
    slow.chmod(0o755)
    env = {**os.environ, "PATH": f"{slow.parent}:{os.environ['PATH']}"}
    runs = [subprocess.Popen(install_argv(str(tmp_path / "ssh")), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outputs = [run.communicate("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA1 head\n", timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err for _, err in outputs]
    assert sum(out.count("CHANGED key") for out, _ in outputs) == 1
    assert len({line for out, _ in outputs for line in out.splitlines() if line.startswith("PUBKEY")}) == 1


def test_hops_run_in_bounded_waves_and_keep_their_names():
    hops = {f"p{i}": ["sh", "-c", f"sleep 0.3; exit {i}"] for i in range(4)}
    started = time.monotonic()
    results = remote_probe.run_hops(hops, timeout=5, parallel=2)
    elapsed = time.monotonic() - started
    assert 0.55 < elapsed < 2.5                                  # two waves of two, not one of four
    assert {name: r["returncode"] for name, r in results.items()} == {"p0": 0, "p1": 1, "p2": 2, "p3": 3}


def test_each_host_starts_its_hops_with_the_next_host():
    from deepfleet.fleet.doctor import DoctorOptions, probe_params
    from deepfleet.fleet.inventory import Fleet, Host
    from deepfleet.fleet.ssh import SshOptions
    fleet = Fleet(hosts=tuple(Host(name=f"g{i}", address=f"10.0.0.{i}") for i in range(1, 5)), source="t")
    order = {h.name: list(probe_params(fleet, h, DoctorOptions(), SshOptions(), share_token=None,
                                       bandwidth={})["hops"]) for h in fleet.hosts}
    assert order == {"g1": ["g2", "g3", "g4"], "g2": ["g3", "g4", "g1"], "g3": ["g4", "g1", "g2"],
                     "g4": ["g1", "g2", "g3"]}


@pytest.mark.parametrize("address,bound", [("10.0.0.1", "10.0.0.1"), ("gpu01", None)])
def test_master_port_listener_binds_the_address_hosts_connect_to(address, bound):
    from deepfleet.fleet.doctor import DoctorOptions, probe_params
    from deepfleet.fleet.inventory import Fleet, Host
    from deepfleet.fleet.ssh import SshOptions
    fleet = Fleet(hosts=(Host(name="m", address=address), Host(name="w", address="10.0.0.2")), source="t")
    params = probe_params(fleet, fleet.hosts[0], DoctorOptions(), SshOptions(), share_token=None, bandwidth={})
    assert params["master"][0] == address and params["listen"].get("address") == bound


def test_probe_reads_link_state_editable_installs_and_versionless_egg_info(tmp_path, monkeypatch):
    assert remote_probe._link_up({"flags": ["BROADCAST", "UP", "LOWER_UP"], "operstate": "UP"})
    assert not remote_probe._link_up({"flags": ["NO-CARRIER", "BROADCAST", "UP"], "operstate": "DOWN"})
    assert remote_probe._is_editable('{"url": "file:///src/x", "dir_info": {"editable": true}}')
    assert not remote_probe._is_editable('{"url": "https://x", "archive_info": {}}')
    (tmp_path / "mypkg.egg-info").mkdir()                      # `setup.py develop`: no version in the name
    (tmp_path / "otherpkg-1.2.dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(remote_probe, "_LISTINGS", {})
    assert remote_probe._installed_version("mypkg") == (None, None, None)
    assert remote_probe._installed_version("otherpkg")[:2] == ("1.2", str(tmp_path))


def test_is_this_machine():
    from deepfleet.fleet.network import is_this_machine
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("192.0.2.1")              # TEST-NET-1: never an address of this machine
    own = source_address_towards("192.0.2.1")
    assert own is None or is_this_machine(own)


def test_master_port_is_reached_while_slow_facts_are_still_being_collected(monkeypatch):
    """The master's listener opens when its probe starts; a host slow to collect (nvidia-smi, torch)
    must still connect inside that window."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    report = {"ready": True, "peers": []}
    accepting = threading.Thread(target=remote_probe.accept_peers, args=(server, report, 1, 1.0), daemon=True)
    accepting.start()
    monkeypatch.setattr(remote_probe, "accelerator_facts", lambda: time.sleep(1.5) or {"count": 0})
    result = remote_probe.facts({"master": ["127.0.0.1", port], "network_seconds": 1.0})
    accepting.join(3)
    assert result["network"]["master"]["ok"] and report["peers"] == ["127.0.0.1"]


def test_the_master_times_the_reverse_lookup_of_each_host_that_connects(monkeypatch):
    """What torch's store does for every client: a resolver that does not answer is reported, bounded."""
    monkeypatch.setattr(remote_probe, "REVERSE_LOOKUP_LIMIT", 0.5)
    def unanswered(*args):
        time.sleep(1.0)
        raise socket.gaierror(-3, "Temporary failure in name resolution")
    monkeypatch.setattr(remote_probe.socket, "getnameinfo", unanswered)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    report = {"ready": True, "peers": []}
    accepting = threading.Thread(target=remote_probe.accept_peers, args=(server, report, 1, 2.0), daemon=True)
    accepting.start()
    socket.create_connection(server.getsockname(), timeout=2).close()
    started = time.monotonic()
    accepting.join(5)
    assert report["reverse_lookup"] == {"127.0.0.1": None} and time.monotonic() - started < 1.0
    assert 1.0 <= remote_probe.reverse_lookup_seconds("127.0.0.1") < 1.5
