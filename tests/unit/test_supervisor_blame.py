"""Whom the supervisor blames when a job stops making progress: pure, from recorded heartbeats."""

import time
from pathlib import Path

from deepfleet.launch.supervisor import HostProcess, Supervisor, SupervisorOptions


def supervisor(now: float, *, h2_last_event: float, h2_step: int = 7, stopped: list[str] = ()) -> Supervisor:
    hosts = [HostProcess(label=name, argv=["true"], env={}) for name in ("h1", "h2")]
    sup = Supervisor(hosts, SupervisorOptions(log_dir=Path("unused"), hang_timeout=8, link_timeout=15),
                     write=lambda line: None)
    h1, h2 = sup.hosts
    h1.last_event, h1.steps = now - 1, {"0": (7, now - 9)}
    h2.last_event, h2.steps, h2.stopped = h2_last_event, {"1": (h2_step, now - 9)}, list(stopped)
    return sup


def test_a_hang_with_a_silent_host_blames_that_host_not_the_rank_waiting_for_it():
    now = time.monotonic()
    sup = supervisor(now, h2_last_event=now - 9, h2_step=8)   # h2 reported a later step, then went quiet
    sup._check_progress(now)
    assert sup.failure.host == "h2" and sup.failure.rank is None
    assert "no word from the host for 9s" in sup.failure.why


def test_a_hang_with_every_host_talking_blames_the_rank_furthest_behind():
    now = time.monotonic()
    sup = supervisor(now, h2_last_event=now - 1, h2_step=8)
    sup._check_progress(now)
    assert (sup.failure.host, sup.failure.rank) == ("h1", "0") and "furthest behind" in sup.failure.why


def test_a_stopped_rank_is_blamed_first():
    now = time.monotonic()
    sup = supervisor(now, h2_last_event=now - 1, stopped=["1"])
    sup._check_progress(now)
    assert (sup.failure.host, sup.failure.rank) == ("h2", "1")


def test_no_failure_before_the_hang_timeout_even_with_a_quiet_host():
    now = time.monotonic()
    sup = supervisor(now, h2_last_event=now - 9)
    for host in sup.hosts:
        host.steps = {rank: (step, now - 2) for rank, (step, _) in host.steps.items()}
    sup._check_progress(now)
    assert sup.failure is None
