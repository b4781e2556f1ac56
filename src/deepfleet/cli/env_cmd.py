"""`deepfleet env check | sync`: the hosts' Python packages against the head's. Parse, call, render."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.cli.fleet_cmd import ExcludeOpt, FleetOpt, HostfileOpt, IncludeOpt, SshConfigOpt, _fleet
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.env_install import describe_result, fetch_all, install_all
from deepfleet.fleet.env_sync import (EnvCheck, HostPlan, check_fleet, head_package_set, plan_sync, sync_setup,
                                      system_python_problems)
from deepfleet.fleet.ssh import options_for
from deepfleet.fleet.wheel_sources import human_size

env_app = typer.Typer(help="Compare every host's Python packages with the head's, and install the differences.",
                      no_args_is_help=True)
PackageOpt = typer.Option([], "--package", help="also compare this head distribution and what it requires "
                                                "(e.g. your own training code's package)")


@env_app.command("check")
def check_command(fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                  ssh_config: Optional[str] = SshConfigOpt, include: Optional[str] = IncludeOpt,
                  exclude: Optional[str] = ExcludeOpt, package: List[str] = PackageOpt) -> None:
    """Compare each host's python with the head's deepfleet closure. Exit 1 when anything differs."""
    fleet = _fleet(fleet_file, hostfile, ssh_config, include, exclude)
    check = check_fleet(fleet, options_for(fleet), head_package_set(package))
    _render_check(check)
    if check.problems:
        raise DeepfleetError(problems=check.problems)
    if check.differences:
        raise typer.Exit(code=1)


@env_app.command("sync")
def sync_command(fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
                 ssh_config: Optional[str] = SshConfigOpt, include: Optional[str] = IncludeOpt,
                 exclude: Optional[str] = ExcludeOpt, package: List[str] = PackageOpt,
                 wheel_dir: List[Path] = typer.Option([], "--wheel-dir", help="dir of wheels to install from "
                                                      "(searched first; pip's cache and downloads after)"),
                 dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, change nothing"),
                 allow_system_python: bool = typer.Option(False, "--allow-system-python",
                                                          help="also install into a host's system python")) -> None:
    """Install the head's versions of what differs into each host's python, from wheels the head sends."""
    for directory in wheel_dir:
        if not directory.is_dir():
            raise DeepfleetError("is not a directory", where=f"--wheel-dir {directory}", fix="give a dir of .whl files")
    fleet = _fleet(fleet_file, hostfile, ssh_config, include, exclude)
    options = options_for(fleet)
    head = head_package_set(package)
    check = check_fleet(fleet, options, head)
    if check.problems:
        raise DeepfleetError(problems=check.problems)
    with tempfile.TemporaryDirectory(prefix="deepfleet-env-") as work:
        plans = plan_sync(check, sync_setup(wheel_dir, head, Path(work)))
        if (problems := system_python_problems(plans, allow=allow_system_python)):
            raise DeepfleetError(problems=problems)
        _render_plan(plans, len(check.hosts))
        if dry_run or not any(p.installs for p in plans):
            return
        results = install_all(plans, fetch_all(plans), Path(work), options)
    for result in results:
        print(describe_result(result) if result.problem is None else f"error: {result.problem.render()}")
    failed = [r for r in results if r.problem]
    if failed:
        raise typer.Exit(code=max(r.exit_code for r in failed))
    after = check_fleet(fleet, options, head)
    _render_check(after)
    if after.differences or after.problems:
        raise typer.Exit(code=1)


def _render_check(check: EnvCheck) -> None:
    if not check.differences:
        if check.hosts:
            named = ", ".join(f"{check.head[k].name} {check.head[k].version}" for k in ("deepfleet", "torch")
                              if k in check.head)
            print(f"{len(check.hosts)} host(s) match the head: {len(check.head)} packages ({named})")
        return
    table = Table(title=f"packages that differ from the head ({len(check.head)} compared)")
    for column in ("host", "package", "head", "host has", "note"):
        table.add_column(column, overflow="fold")
    for d in check.differences:
        table.add_row(d.host, d.dist.name, d.dist.version, d.found or "-", d.note)
    Console(width=max(120, Console().width)).print(table)
    hosts = sorted({d.host for d in check.differences})
    print(f"{len(check.differences)} difference(s) on {len(hosts)} host(s); `deepfleet env sync` installs them")


def _render_plan(plans: list[HostPlan], host_count: int) -> None:
    for plan in plans:
        env = plan.env
        print(f"{env.host.name} ({env.python}):")
        for source in plan.installs:
            print(f"  install {source.dist.pin} from {source.describe()}")
        for difference, why in plan.skipped:
            print(f"  skip {difference.dist.name}: {why}")
    files = [s for p in plans for s in p.installs if s.kind == "file"]
    if plans:
        print(f"{sum(len(p.installs) for p in plans)} install(s) on {len(plans)} of {host_count} host(s); "
              f"{human_size(sum(s.size or 0 for s in files))} of wheel files already on the head")
    else:
        print(f"nothing to do: {host_count} host(s) match the head")
