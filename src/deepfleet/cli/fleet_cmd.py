"""Fleet commands: `hosts`, `hostfile`, `doctor`, `ssh-setup`. Parse, call one function, render."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.discover import discover_hosts
from deepfleet.fleet.doctor_store import save_doctor_facts
from deepfleet.fleet.doctor import DoctorOptions, DoctorReport, run_doctor
from deepfleet.fleet.inventory import Fleet, hosts_from_names, render_hostfile
from deepfleet.fleet.sources import resolve_fleet
from deepfleet.fleet.ssh import options_for
from deepfleet.fleet.ssh_setup import HEAD, SetupOptions, SetupReport, run_ssh_setup
from deepfleet.env_vars import masked

FleetOpt = typer.Option(None, "--fleet", help="fleet.yaml (default: ./fleet.yaml, SLURM, PBS, or this machine)")
HostfileOpt = typer.Option(None, "--hostfile", help="DeepSpeed hostfile (`host slots=N` lines)")
IncludeOpt = typer.Option(None, "--include", help="only these hosts (and GPUs), DeepSpeed style: gpu1:0,1@gpu2")
ExcludeOpt = typer.Option(None, "--exclude", help="leave out these hosts (or GPUs), DeepSpeed style: gpu3 or gpu1:7")
SshConfigOpt = typer.Option(None, "--ssh-config", help="ssh config file for every ssh call (ssh -F)")
SEVERITY_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def _file_to_write(path: Optional[str]) -> Optional[str]:
    """An output file option, checked before any work: a file name in an existing directory."""
    if path is not None and (Path(path).is_dir() or not Path(path).name or not Path(path).parent.is_dir()):
        raise typer.BadParameter(f"{path!r}: needs a file name in an existing directory")
    return path


def _fleet(fleet_file: Optional[str], hostfile: Optional[str], ssh_config: Optional[str] = None,
           include: Optional[str] = None, exclude: Optional[str] = None) -> Fleet:
    fleet = resolve_fleet(fleet_file=fleet_file, hostfile=hostfile, include=include, exclude=exclude)
    if ssh_config:
        if not Path(ssh_config).is_file():
            raise DeepfleetError("ssh config file not found", where=ssh_config, fix="check the --ssh-config path")
        fleet = replace(fleet, ssh=replace(fleet.ssh, config_file=ssh_config))
    return fleet


def hosts_command(fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                  as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Print the resolved fleet: where it came from and every host."""
    fleet = _fleet(fleet_file, hostfile)
    rows = [{"name": h.name, "address": h.address, "user": h.user, "port": h.port,
             "slots": h.slots if h.slots is not None else "per GPU",
             "interface": h.interface, "env": masked(dict(h.env))}
            for h in fleet.hosts]
    if as_json:
        print(json.dumps({"source": fleet.source, "python": fleet.python, "master_port": fleet.master_port,
                          "hosts": rows}, indent=2))
        return
    table = Table(title=f"fleet from {fleet.source} (master port {fleet.master_port})")
    for column in ("name", "address", "user", "port", "slots", "interface", "env"):
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row[c] in (None, {}) else str(row[c]) for c in
                        ("name", "address", "user", "port", "slots", "interface", "env")))
    Console().print(table)
    per_gpu = sum(h.slots is None for h in fleet.hosts)
    ranks = f"{sum(h.slots or 0 for h in fleet.hosts)} ranks" + (f" + one per GPU on {per_gpu} host(s)" if per_gpu else "")
    print(f"{ranks} on {len(fleet.hosts)} host(s); python {fleet.python}")


def hostfile_command(fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                     discover: bool = typer.Option(False, "--discover", help="ask every host for its GPU count"),
                     output: Optional[str] = typer.Option(None, "-o", "--output", callback=_file_to_write,
                                                          help="write here instead of stdout"),
                     ssh_config: Optional[str] = SshConfigOpt) -> None:
    """Print (or write) a DeepSpeed hostfile for the fleet; --discover counts GPUs on each host."""
    fleet = _fleet(fleet_file, hostfile, ssh_config)
    unknown = [h.name for h in fleet.hosts if h.slots is None]
    if unknown and not discover:
        raise DeepfleetError(f"slots of host(s) {', '.join(unknown)} not set", where=fleet.source,
                             fix="pass --discover (asks each host for its GPU count), or set slots: for them")
    hosts = discover_hosts(fleet, options_for(fleet)) if discover else list(fleet.hosts)
    text = render_hostfile(hosts)
    if output is None:
        print(text, end="")
        return
    target = Path(output)
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)  # never leave a half-written hostfile
    except OSError as exc:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
        raise DeepfleetError(f"cannot write hostfile: {exc.strerror}", where=output, fix="check the path") from None
    print(f"wrote {output} ({len(hosts)} hosts, {sum(h.slots for h in hosts)} slots)")


def doctor_command(fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                   ssh_config: Optional[str] = SshConfigOpt, include: Optional[str] = IncludeOpt,
                   exclude: Optional[str] = ExcludeOpt,
                   output_dir: Optional[str] = typer.Option(None, "--output-dir", help="dir checkpoints go to"),
                   checksum: List[str] = typer.Option([], "--checksum", help="data file or model dir to compare across hosts"),
                   recipe: Optional[str] = typer.Option(None, "--recipe", help="also compare this recipe's local "
                                                        "model dir and data files across hosts"),
                   no_matrix: bool = typer.Option(False, "--no-matrix", help="skip host->host ssh"),
                   no_network: bool = typer.Option(False, "--no-network", help="skip master port and bandwidth"),
                   no_iperf3: bool = typer.Option(False, "--no-iperf3", help="built-in bandwidth test even with iperf3"),
                   as_json: bool = typer.Option(False, "--json", help="print JSON"),
                   record: Optional[str] = typer.Option(None, "--record", callback=_file_to_write,
                                                        help="also save the raw facts here")) -> None:
    """Check every host in parallel; every finding has a fix. Exit 2 on any fail."""
    fleet = _fleet(fleet_file, hostfile, ssh_config, include, exclude)
    if recipe:
        from deepfleet.plan.recipe_io import load_recipe
        from deepfleet.prepare import recipe_paths

        checksum = [*checksum, *recipe_paths(load_recipe(recipe, []), fleet.workdir or os.getcwd())]
    options = DoctorOptions(output_dir=output_dir, checksum_paths=tuple(dict.fromkeys(checksum)), matrix=not no_matrix,
                            network=not no_network, iperf3=not no_iperf3)
    report = run_doctor(fleet, options, options_for(fleet))
    save_doctor_facts(fleet, report.record())   # the measured bandwidth, for `deepspeed: auto`
    if record:
        Path(record).write_text(json.dumps(report.record(), indent=1))
    print(report.to_json()) if as_json else _render_doctor(report)
    if report.failed:
        raise typer.Exit(code=2)


def _render_doctor(report: DoctorReport) -> None:
    table = Table(title=f"deepfleet doctor: {len(report.collected.facts)} host(s) in {report.seconds:.1f}s")
    for column in ("check", "host", "result", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for f in report.findings:
        table.add_row(f.check, f.host, f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]", f.message, f.fix)
    Console(width=max(120, Console().width)).print(table)
    fails = sum(f.severity == "fail" for f in report.findings)
    warns = sum(f.severity == "warn" for f in report.findings)
    print(f"{fails} fail, {warns} warn")


def ssh_setup_command(hosts: Optional[str] = typer.Option(None, "--hosts", help="a,b,c (or user@a,...)"),
                      user: Optional[str] = typer.Option(None, "--user", help="login user for --hosts"),
                      port: Optional[int] = typer.Option(None, "--port", help="ssh port for --hosts"),
                      fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                      ssh_config: Optional[str] = SshConfigOpt,
                      ssh_dir: Optional[str] = typer.Option(
                          None, "--ssh-dir", help="key, known_hosts, authorized_keys dir, the same path on every host "
                          "(default ~/.ssh); on the head, an IdentityFile or UserKnownHostsFile your ssh config "
                          "names for a host wins (`ssh -G HOST`), as every later ssh uses it")) -> None:
    """Key, host keys (accept-new), full mesh, and the N x N reachability matrix."""
    if ssh_dir and Path(ssh_dir).expanduser().exists() and not Path(ssh_dir).expanduser().is_dir():
        raise DeepfleetError("is not a directory", where=f"--ssh-dir {ssh_dir}", fix="give the ssh directory, e.g. ~/.ssh")
    fleet = _fleet(fleet_file, hostfile, ssh_config)
    if hosts:
        fleet = replace(fleet, hosts=tuple(hosts_from_names(hosts, user=user, port=port)), source="--hosts")
    setup = SetupOptions(ssh_dir=ssh_dir, ssh_dir_given=True) if ssh_dir else SetupOptions()
    report = run_ssh_setup(fleet, setup)
    _render_setup(report)
    if report.problems:
        raise DeepfleetError(problems=report.problems)


def _render_setup(report: SetupReport) -> None:
    if report.matrix:
        targets = [h.name for h in report.hosts if h.name in report.matrix.get(HEAD, {})]
        table = Table(title="ssh reachability (row -> column)")
        table.add_column("from \\ to")
        for target in targets:
            table.add_column(target)
        for source, row in report.matrix.items():
            table.add_row(source, *("[green]ok[/]" if row.get(t) else "[bold red]FAIL[/]" if row.get(t) is False
                                    else "?" for t in targets))
        Console().print(table)
    print("changed: " + ("; ".join(report.changes) if report.changes else "nothing (already set up)"))


def register(app: typer.Typer) -> None:
    app.command("hosts")(hosts_command)
    app.command("hostfile")(hostfile_command)
    app.command("doctor")(doctor_command)
    app.command("ssh-setup")(ssh_setup_command)
