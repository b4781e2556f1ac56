"""Startup timings: the /proc parse, the rank's back-to-back phases, combining the head's, the agent's
and rank 0's figures (each a duration on one clock), and how they are shown and saved."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepfleet import contract
from deepfleet.launch.startup_timings import (HeadStartup, HostLaunch, RankStartup, StartupWatch, combine_startup,
                                              finish_startup, parse_rank_startup, phase_rows, render_startup_line,
                                              render_startup_table, write_startup_json)
from deepfleet.process_start import process_age_seconds
from deepfleet.train.startup_marks import StartupMarks

# A command name with spaces and a ")" of its own: fields count from the last ")".
STAT = "4242 (python (x) y) S 1 4242 4242 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 12345 3133440 379 0 0"


def test_process_age_from_proc_stat_counts_fields_after_the_last_parenthesis():
    assert process_age_seconds(STAT, boottime_now=200.0, clock_ticks=100) == pytest.approx(200.0 - 123.45)


@pytest.mark.parametrize("text", ["", "4242 (python) S 1", "4242 (python) S 1 x y z" + " z" * 20])
def test_process_age_of_text_that_is_not_a_stat_line_is_none(text):
    assert process_age_seconds(text, boottime_now=200.0, clock_ticks=100) is None


def test_process_age_never_negative_and_needs_a_tick_rate():
    assert process_age_seconds(STAT, boottime_now=100.0, clock_ticks=100) == 0.0
    assert process_age_seconds(STAT, boottime_now=200.0, clock_ticks=0) is None


def test_a_process_knows_its_own_age_from_before_python_started():
    code = ("import time; time.sleep(0.4); from deepfleet.process_start import own_process_age, "
            "process_started_monotonic; print(own_process_age(), time.monotonic() - process_started_monotonic())")
    age, since = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())
    assert 0.4 <= age < 5 and 0.4 <= since < 5


def test_the_agents_spawn_mark_and_age_cover_one_span_on_the_tick_grid():
    code = ("import json, os, subprocess, sys, time; time.sleep(0.2); "
            "from deepfleet.process_start import spawn_mark, process_started_wall; "
            "age, mark = spawn_mark(); child = subprocess.run([sys.executable, '-c', "
            "'from deepfleet.process_start import process_started_wall as w; print(w())'], "
            "capture_output=True, text=True, check=True, env=os.environ).stdout; "
            "print(json.dumps([age, mark, process_started_wall(), float(child), os.sysconf('SC_CLK_TCK')]))")
    age, mark, started, child_started, ticks = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.2 <= age < 5 and abs(round(age * ticks) - age * ticks) < 1e-6      # a whole number of ticks
    assert abs((mark - age) - started) < 0.002        # the age ends at the mark: agent + spawn add up
    assert child_started >= mark - 0.002              # a process spawned after the mark started after it


def test_rank_phases_are_back_to_back_from_the_process_start():
    marks = StartupMarks(started=10.0, started_wall=1000.0)
    for phase, now in (("imports", 16.0), ("rendezvous", 16.5), ("data", 17.0), ("first_step", 20.0)):
        marks.end(phase, now=now)
    marks.end("imports", now=30.0)   # a phase ends once
    assert marks.phases == {"imports": 6.0, "rendezvous": 0.5, "data": 0.5, "first_step": 3.0}
    assert sum(marks.phases.values()) == 20.0 - 10.0
    with pytest.raises(ValueError):
        marks.end("lunch")


def test_the_rank_line_round_trips_through_the_contract():
    marks = StartupMarks(started=0.0, started_wall=1000.25)
    marks.end("imports", now=6.0)
    match = contract.RANK_STARTUP_LINE.match("[0]:" + marks.line())
    assert match and match.group(1) == "0"
    assert parse_rank_startup(match.group(2)) == RankStartup(started_at=1000.25, phases={"imports": 6.0})


@pytest.mark.parametrize("text", ["", "{", "[]", '{"phases": {}}', '{"started_at": "x", "phases": {}}',
                                  '{"started_at": 1, "phases": {"imports": "slow"}}'])
def test_a_malformed_rank_report_is_none(text):
    assert parse_rank_startup(text) is None


HEAD = HeadStartup(process_started=100.0, cli_import=0.5, planning=1.5, data=0.25, ended=102.5)
RANK = RankStartup(started_at=5001.5, phases={"imports": 6.0, "rendezvous": 0.1, "data": 0.2, "model": 0.3,
                                              "deepspeed_init": 1.0, "setup": 0.4, "first_step": 0.5})


def _launch(transport="ssh"):
    return HostLaunch(transport=transport, spawned=103.0, first_event=103.5, agent_seconds=0.125,
                      ranks_spawned_at=5000.0)


def test_combined_figures_take_each_duration_from_one_clock():
    timings = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="h1",
                              launches={"h1": _launch(), "h2": HostLaunch(transport="ssh")}, rank=RANK,
                              first_step_seen=115.0)
    assert (timings.cli_import, timings.planning, timings.head_data) == (0.5, 1.5, 0.25)
    assert timings.launch_prep == 0.5              # head data ended at 102.5, agent spawned at 103.0
    assert timings.connect == 0.375                # 0.5 s to the first event, 0.125 s of it the agent's
    assert timings.agent_start == 0.125
    assert timings.rank_spawn == 1.5           # both on h1's clock
    assert (timings.rank_imports, timings.deepspeed_init, timings.first_step) == (6.0, 1.0, 0.5)
    assert timings.total == 15.0                   # the command's start to the first step seen
    measured = [seconds for _, _, seconds in phase_rows(timings) if seconds is not None]
    assert timings.other == pytest.approx(15.0 - sum(measured)) and timings.other >= 0
    assert timings.hosts == {"h1": {"connect": 0.375, "agent_start": 0.125},
                             "h2": {"connect": None, "agent_start": None}}


def test_a_restart_has_its_own_figures_from_its_launch():
    timings = combine_startup(attempt=1, head=HEAD, attempt_started=200.0, host="h1", launches={"h1": _launch()},
                              rank=RANK, first_step_seen=210.0)
    assert (timings.cli_import, timings.planning, timings.head_data) == (None, None, None)
    assert timings.total == 10.0
    assert "(restart 1)" in render_startup_line(timings) and "cli import -" in render_startup_line(timings)


def test_a_local_host_has_no_connect_phase():
    timings = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="vm",
                              launches={"vm": _launch("local")}, rank=RANK, first_step_seen=115.0)
    assert timings.connect is None and timings.agent_start == 0.125
    assert "connect -" in render_startup_line(timings)


def test_phases_rank_0_never_reached_are_absent_not_invented():
    died = RankStartup(started_at=5001.5, phases={"imports": 6.0})
    timings = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="h1", launches={"h1": _launch()},
                              rank=died, first_step_seen=None)
    assert timings.rank_imports == 6.0 and timings.rendezvous is None and timings.first_step is None
    assert timings.total is None and timings.other is None
    nothing = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="h1", launches={}, rank=None,
                              first_step_seen=None)
    assert all(seconds is None for name, _, seconds in phase_rows(nothing)
               if name not in ("cli_import", "planning", "head_data"))
    assert render_startup_line(nothing).startswith("startup: rank 0 did not reach its first step")


def test_line_and_table_show_every_phase_and_the_total():
    timings = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="h1", launches={"h1": _launch()},
                              rank=RANK, first_step_seen=115.0)
    line = render_startup_line(timings)
    assert line.startswith("startup 15.0 s to the first step: cli import 0.5 · planning 1.5 ·")
    assert "rank imports 6.0" in line and "deepspeed init 1.0" in line and line.count(" · ") == 14
    table = render_startup_table(timings).splitlines()
    assert table[0] == "startup phases on h1:"
    assert any(row.split()[-2:] == ["6.0", "40%"] for row in table if "rank imports" in row)
    assert table[-1].split()[-2:] == ["15.0", "100%"]


def test_startup_json_is_written_whole_and_reads_back(tmp_path):
    timings = combine_startup(attempt=0, head=HEAD, attempt_started=102.75, host="h1", launches={"h1": _launch()},
                              rank=RANK, first_step_seen=115.0)
    path = write_startup_json(tmp_path / "logs" / "attempt-0", timings)
    data = json.loads(path.read_text())
    assert data["total"] == 15.0 and data["connect"] == 0.375 and data["other"] == pytest.approx(timings.other, abs=1e-3)
    assert [p.name for p in path.parent.iterdir()] == ["startup.json"]


def test_the_watch_reports_rank_0_once_and_saves_at_the_end(tmp_path):
    watch = StartupWatch(attempt=0, head=None, log_dir=tmp_path, transports={"h1": "ssh", "h2": "ssh"})
    for label in ("h1", "h2"):
        watch.spawned(label)
        watch.event(label, {"event": "started", "agent_seconds": 0.0, "spawned_at": 1000.0})
    watch.event("h1", {"event": "heartbeat"})
    report = json.dumps({"started_at": 1001.0, "phases": {"imports": 2.0, "first_step": 0.5}})
    shown = watch.rank_report("h1", report)
    assert shown and shown.startswith("startup ") and watch.rank_report("h1", report) is None
    assert json.loads((tmp_path / "startup.json").read_text())["rank_spawn"] == 1.0
    assert finish_startup(watch, table=False) == []                    # the line was already shown
    assert "total to the first step" in finish_startup(watch, table=True)[0]
    unseen = StartupWatch(attempt=0, head=None, log_dir=tmp_path / "b", transports={"h1": "ssh"})
    assert finish_startup(unseen, table=False)[0].startswith("startup: rank 0 did not reach")


def test_the_supervisor_keeps_the_report_off_the_console_and_shows_the_summary(tmp_path):
    import asyncio

    from deepfleet.launch.supervisor import HostProcess, Supervisor, SupervisorOptions

    report = "[0]:" + contract.startup_line(1000.0, {"imports": 2.0, "first_step": 0.5})
    started = contract.AGENT_EVENT_PREFIX + json.dumps({"event": "started", "agent_seconds": 0.0,
                                                        "spawned_at": 999.0})
    script = f"import sys; sys.stdin.readline(); print({started!r}); print({report!r}); print('[0]:step 1/1')"
    host = HostProcess(label="h1", argv=[sys.executable, "-c", script], env={}, transport="ssh")
    shown: list[str] = []
    watch = StartupWatch(attempt=0, head=None, log_dir=tmp_path, transports={"h1": "ssh"})
    outcome = asyncio.run(Supervisor([host], SupervisorOptions(log_dir=tmp_path), write=shown.append,
                                     startup=watch).run())
    assert outcome.exit_code == 0
    assert not any(contract.STARTUP_LINE_PREFIX in line for line in shown), shown
    assert any(line.startswith("startup ") and "rank spawn 1.0" in line for line in shown), shown
    assert "h1/[0]:step 1/1" in shown
    assert report in (tmp_path / "h1.log").read_text()      # the host log keeps everything
    timings = json.loads((tmp_path / "startup.json").read_text())
    assert timings["agent_start"] == 0.0 and timings["connect"] >= 0 and timings["rank_imports"] == 2.0
