"""bench comm: nccl-tests bandwidth formulas, size parsing, the report round trip, table and JSON rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from deepfleet.bench.comm import (CommReport, Measurement, Skipped, algbw, bus_factor, busbw, find_report,
                                  format_bytes, iterations_for, measurement, parse_size, parse_sizes,
                                  peak_bytes_per_rank, report_line)
from deepfleet.bench.comm_render import comm_table, plot_comm, summary_line
from deepfleet.bench.comm_run import CommOptions, ranks_per_host, worker_command
from deepfleet.bench.comm_worker import parse_args
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host

MiB = 1 << 20


@pytest.mark.parametrize("operation, n, factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 4, 1.5), ("all_reduce", 8, 1.75), ("all_reduce", 1, 0.0),
    ("all_gather", 2, 0.5), ("all_gather", 8, 0.875), ("reduce_scatter", 4, 0.75)])
def test_bus_factor_matches_nccl_tests(operation, n, factor):
    assert bus_factor(operation, n) == pytest.approx(factor)


def test_bandwidths_from_size_and_time():
    assert algbw(64 * MiB, 0.5) == pytest.approx(2 * 64 * MiB)
    # 8 ranks all-reduce 1 GB in 1 s: algbw 1 GB/s, busbw 1.75 GB/s
    assert busbw("all_reduce", 10 ** 9, 1.0, 8) == pytest.approx(1.75e9)
    m = measurement("all_gather", 4 * MiB, iterations=10, seconds=0.01, n_ranks=4, best_seconds=0.005)
    assert m.algbw == pytest.approx(4 * MiB / 0.01) and m.busbw == pytest.approx(0.75 * m.algbw)
    assert m.best_busbw == pytest.approx(2 * m.busbw)


def test_bus_factor_rejects_unknown_collective():
    with pytest.raises(ValueError):
        bus_factor("broadcast", 2)


def test_parse_sizes_range_steps_by_four_and_keeps_both_ends():
    assert parse_sizes("1KiB..1GiB") == [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22,
                                         1 << 24, 1 << 26, 1 << 28, 1 << 30]
    assert parse_sizes("1KiB..3KiB") == [1024, 3072]
    assert parse_sizes("64MiB, 1MiB,1MiB") == [MiB, 64 * MiB]
    assert parse_size("4096") == 4096 and parse_size("2mb") == 2_000_000


@pytest.mark.parametrize("text", ["1XB", "-4KiB", "0", "", "1GiB..1KiB", ","])
def test_bad_sizes_are_user_errors(text):
    with pytest.raises(DeepfleetError) as error:
        parse_sizes(text)
    assert "--sizes" in error.value.render() and "fix:" in error.value.render()


def test_iterations_fit_the_budget():
    assert iterations_for(0.1, budget_seconds=2.0, max_iterations=50) == 20
    assert iterations_for(0.001, budget_seconds=2.0, max_iterations=50) == 50
    assert iterations_for(5.0, budget_seconds=2.0, max_iterations=50) == 1
    assert peak_bytes_per_rank(1000, 4) == 1250


def sample_report() -> CommReport:
    return CommReport(backend="gloo", n_ranks=2, n_hosts=2, dtype="float32", measurements=[
        measurement("all_reduce", MiB, iterations=20, seconds=0.004, n_ranks=2, best_seconds=0.003),
        measurement("all_reduce", 64 * MiB, iterations=5, seconds=0.1, n_ranks=2, best_seconds=0.08),
        measurement("all_gather", MiB, iterations=20, seconds=0.002, n_ranks=2, best_seconds=0.002)],
        skipped=[Skipped(operation="all_reduce", size_bytes=1 << 30, reason="memory")])


def test_report_line_round_trips_through_prefixed_log_lines():
    report = sample_report()
    lines = ["h1/[0]:starting", f"h1/[0]:{report_line(report)}", "job finished on every host"]
    assert find_report(lines) == report
    assert find_report(["nothing here"]) is None
    assert json.loads(report.to_json())["measurements"][1]["busbw"] == pytest.approx(64 * MiB / 0.1)


def test_table_and_summary_show_busbw_and_skips():
    console = Console(record=True, width=200)
    console.print(comm_table(sample_report()))
    text = console.export_text()
    assert "0.671" in text and "0.839" in text   # 64 MiB / 0.1 s = 0.671 GB/s (1e9); / 0.08 s = 0.839
    assert "skipped: memory" in text and "1 GiB" in text
    assert summary_line(sample_report()) == "peak all-reduce busbw 0.671 GB/s at 64 MiB"
    assert format_bytes(1536) == "1.5 KiB"


def test_plot_is_written(tmp_path: Path):
    plot_comm(sample_report(), tmp_path / "sub" / "comm.png")
    assert (tmp_path / "sub" / "comm.png").read_bytes()[:4] == b"\x89PNG"


def test_worker_command_round_trips_through_the_worker_parser(tmp_path: Path):
    options = CommOptions(sizes=[1024, MiB], operations=["all_reduce"], run_dir=tmp_path, budget_seconds=0.5)
    argv = worker_command(options)
    assert argv[:3] == ["python", "-m", "deepfleet.bench.comm_worker"]
    args = parse_args(argv[3:])
    assert args.sizes == [1024, MiB] and args.operations == ["all_reduce"] and args.budget == 0.5


def test_local_cpu_machine_gets_two_ranks():
    local = Fleet(hosts=(Host(name="me", address="localhost", local=True),), source="local machine")
    remote = Fleet(hosts=(Host(name="a", address="a"), Host(name="b", address="b")), source="fleet.yaml")
    assert ranks_per_host(local, None, gpus=0) == 2
    assert ranks_per_host(local, None, gpus=4) is None
    assert ranks_per_host(remote, None, gpus=0) is None
    assert ranks_per_host(remote, 3, gpus=0) == 3


@pytest.mark.parametrize("args, where", [(["--ops", "broadcast"], "--ops"), (["--sizes", "9ZiB"], "--sizes")])
def test_cli_rejects_bad_input_with_one_line(monkeypatch, capsys, args, where):
    from deepfleet.cli.app import main
    monkeypatch.setattr("sys.argv", ["deepfleet", "bench", "comm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {where}:") and "Traceback" not in err
