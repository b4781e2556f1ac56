"""The launch sends the prepared data to the fleet's ssh hosts only, and says what it sent."""

from deepfleet import prepare
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.sync import HostOutcome, SyncReport


def _send(monkeypatch, hosts, outcomes):
    calls, lines = [], []

    def fake_sync(fleet, paths):
        calls.append(([h.name for h in fleet.hosts], paths))
        return SyncReport(items=[], shape="direct: head -> each host", outcomes=outcomes)

    monkeypatch.setattr(prepare, "run_sync", fake_sync)
    prepare.send_prepared_data(Fleet(hosts=tuple(hosts), source="test"), "/cache/abc", lines.append)
    return calls, lines


def test_ssh_hosts_get_the_entry_and_a_line_says_so(monkeypatch):
    hosts = [Host(name="head", address="localhost", local=True), Host(name="h1", address="10.0.0.1"),
             Host(name="h2", address="10.0.0.2")]
    outcomes = [HostOutcome(host="h1", verdict="unchanged"), HostOutcome(host="h2", verdict="verified", bytes=3 << 20)]
    calls, lines = _send(monkeypatch, hosts, outcomes)
    assert calls == [(["h1", "h2"], ["/cache/abc"])]
    assert lines == ["data: sent the prepared data (3.0 MiB) to h2 (direct: head -> each host)"]


def test_a_host_it_does_not_reach_tokenizes_for_itself(monkeypatch):
    outcomes = [HostOutcome(host="h1", verdict="failed", what="No space left on device")]
    _, lines = _send(monkeypatch, [Host(name="h1", address="10.0.0.1")], outcomes)
    assert lines == ["warning: the prepared data did not reach h1 (No space left on device); its ranks tokenize "
                     "the data themselves"]


def test_shared_storage_says_nothing_and_slurm_nodes_get_nothing(monkeypatch):
    calls, lines = _send(monkeypatch, [Host(name="h1", address="10.0.0.1")], [HostOutcome(host="h1", verdict="unchanged")])
    assert calls and lines == []
    calls, _ = _send(monkeypatch, [Host(name="n1", address="n1", via_srun=True)], [])
    assert calls == []
