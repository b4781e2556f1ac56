"""Fleet commands through the real CLI entry (`main`): bad input is one line per problem and exit 2."""

import json
import sys

import pytest

from deepfleet.cli.app import main


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["deepfleet", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("text, first", [
    ("gpu1 slots=8\ngpu2 eight\n", "error: {hf}:2: not a hostfile line"),
    ("gpu1 slots=8\ngpu1 slots=8\n", "error: {hf}:2: host 'gpu1' listed twice"),
    ("gpu1 slots=0\n", "error: {hf}:1: slots=0"),
    ("gpu1`reboot` slots=1\n", "error: {hf}:1: host 'gpu1`reboot`' contains characters"),
])
def test_bad_hostfile_is_one_line_exit_2(monkeypatch, capsys, tmp_path, text, first):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    code, out, err = run_cli(monkeypatch, capsys, "hosts", "--hostfile", str(hostfile))
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(first.format(hf=hostfile)), err


def test_unknown_fleet_key_did_you_mean(monkeypatch, capsys, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("hosts: [a]\nmaster_prot: 29500\n")
    code, _, err = run_cli(monkeypatch, capsys, "doctor", "--fleet", str(fleet))
    assert code == 2 and err.startswith(f'error: {fleet}:2: unknown key master_prot (did you mean "master_port"?)')


def test_bad_slurm_nodelist(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-")
    code, _, err = run_cli(monkeypatch, capsys, "hosts")
    assert code == 2 and err.startswith("error: SLURM_JOB_NODELIST: bad node list 'gpu[01-'") and "Traceback" not in err


def test_hosts_json_masks_secrets_and_hostfile_prints(monkeypatch, capsys, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("hosts:\n  - {address: gpu1, slots: 2, env: {HF_TOKEN: hf_abc, NCCL_DEBUG: INFO}}\n  - gpu2\n")
    code, out, _ = run_cli(monkeypatch, capsys, "hosts", "--fleet", str(fleet), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["hosts"][0]["env"] == {"HF_TOKEN": "****", "NCCL_DEBUG": "INFO"} and "hf_abc" not in out
    code, _, err = run_cli(monkeypatch, capsys, "hostfile", "--fleet", str(fleet))
    assert code == 2 and f"error: {fleet}: slots of host(s) gpu2 not set" in err and "--discover" in err
    fleet.write_text("hosts:\n  - {address: gpu1, slots: 2}\n  - {address: gpu2, slots: 1}\n")
    code, out, _ = run_cli(monkeypatch, capsys, "hostfile", "--fleet", str(fleet))
    assert code == 0 and out == "gpu1 slots=2\ngpu2 slots=1\n"


def test_hosts_metacharacters_in_ssh_setup(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "ssh-setup", "--hosts", "gpu1,gpu2|sh")
    assert code == 2 and err.startswith("error: --hosts: host 'gpu2|sh' contains characters") and len(err.splitlines()) == 1


def test_local_doctor_passes_and_json_is_parseable(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("SLURM_JOB_NODELIST", "PBS_NODEFILE"):
        monkeypatch.delenv(name, raising=False)
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--json", "--output-dir", str(tmp_path))
    report = json.loads(out)
    assert code == 0 and not report["failed"]
    assert {f["check"] for f in report["findings"]} >= {"ssh", "python", "versions", "accelerators", "workdir"}
