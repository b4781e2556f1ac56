"""Usage errors (unknown command or option, a bad option value) are one `error:` line and exit 2,
like every other bad input, instead of click's boxed panel."""

import sys
from pathlib import Path

import pytest

from deepfleet.cli.app import main


@pytest.mark.parametrize("args, command, fragment", [
    (["bogus"], "deepfleet", "No such command 'bogus'."),
    (["plan", "--nodes", "abc", "r.yaml"], "deepfleet plan", "Invalid value for '--nodes'"),
    (["plan", "--nosuch"], "deepfleet plan", "No such option: --nosuch"),
    (["launch", "--backend", "bogus", "--", "true"], "deepfleet launch", "Invalid value for '--backend'"),
    (["bench", "comm", "--bogus"], "deepfleet bench comm", "No such option: --bogus"),
])
def test_usage_error_is_one_line_exit_2(monkeypatch, capsys, args, command, fragment):
    monkeypatch.setattr(sys, "argv", ["deepfleet", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"error: {command}: {fragment}") and err.rstrip().endswith(f"(fix: see `{command} --help`)")


def test_help_still_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["deepfleet", "plan", "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0 and "Usage" in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["hostfile", "--hostfile", "{hosts}", "-o", "{tmp}"], "Invalid value for '-o' / '--output'"),
    (["doctor", "--hostfile", "{hosts}", "--record", "{tmp}/no/such.json"], "Invalid value for '--record'"),
    (["bench", "comm", "--png", "{tmp}/plot.txt"], "Invalid value for '--png'"),
    (["bench", "comm", "--run-dir", "{hosts}"], "Invalid value for '--run-dir'"),
    (["launch", "--run-dir", "{hosts}", "--", "true"], "Invalid value for '--run-dir'"),
    (["ssh-setup", "--hosts", "a", "--ssh-dir", "{hosts}"], "--ssh-dir {hosts}: is not a directory"),
])
def test_output_paths_are_checked_before_any_work(monkeypatch, capsys, tmp_path, args, fragment):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=1\n")
    monkeypatch.setattr(sys, "argv", ["deepfleet", *(a.format(hosts=hosts, tmp=tmp_path) for a in args)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.splitlines() == [err.strip()], err
    assert fragment.format(hosts=hosts) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]


DEMO = str(Path(__file__).resolve().parents[2] / "src" / "deepfleet" / "assets" / "demo.yaml")


@pytest.mark.parametrize("args, fragment", [
    (["plan", DEMO, "--nodes", "2", "--fleet", "f.yaml"], "error: command line: both --fleet and --nodes given"),
    (["plan", DEMO, "--nodes", "2", "--gpu-mem", "0"], "error: --gpu-mem: cannot read memory size '0'"),
    (["plan", DEMO, "--nodes", "2", "--link-gbps", "-5"], "Invalid value for '--link-gbps'"),
    (["train", DEMO, "--nproc", "0"], "Invalid value for '--nproc'"),
])
def test_option_values_out_of_range_are_refused(monkeypatch, capsys, args, fragment):
    monkeypatch.setattr(sys, "argv", ["deepfleet", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.splitlines() == [err.strip()] and fragment in err, err
