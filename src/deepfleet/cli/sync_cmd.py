"""`deepfleet sync PATH...`: parse, call `run_sync`, render the per-host table."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.cli.fleet_cmd import ExcludeOpt, FleetOpt, HostfileOpt, IncludeOpt, SshConfigOpt, _fleet
from deepfleet.errors import DeepfleetError
from deepfleet.fleet.sync import SyncOptions, SyncReport, run_sync

SHAPES = ("auto", "direct", "chain", "tree")
LINK_CHOICES = ("refuse", "keep")
VERDICT_STYLE = {"verified": "green", "unchanged": "green", "source": "green", "failed": "bold red"}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise DeepfleetError(f"unknown value {value!r}", where=name, fix=f"use one of: {', '.join(choices)}")
    return value


def sync(paths: List[str] = typer.Argument(..., help="files or dirs on this machine"),
         to: Optional[str] = typer.Option(None, "--to", help="put each PATH into this dir on every host "
                                          "(default: the same absolute path)"),
         fleet_file: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
         ssh_config: Optional[str] = SshConfigOpt, include: Optional[str] = IncludeOpt,
         exclude: Optional[str] = ExcludeOpt,
         shape: str = typer.Option("auto", "--shape", help="fan-out: auto, direct, chain or tree"),
         outside_links: str = typer.Option("refuse", "--outside-links",
                                           help="a symlink leaving the tree: refuse, or keep it as a link"),
         delete: bool = typer.Option(False, "--delete", help="remove files on the hosts that the source lacks"),
         rehash: bool = typer.Option(False, "--rehash", help="re-hash every file on the hosts, trusting no "
                                     "stored manifest"),
         stall_timeout: float = typer.Option(120.0, "--stall-timeout", min=1,
                                             help="seconds a host may take no data before it is cut loose")) -> None:
    """Copy files and dirs to every host, sending only what differs; verify every host at the end."""
    options = SyncOptions(to=to, shape=_choice("--shape", shape, SHAPES), delete=delete, rehash=rehash,
                          stall_seconds=stall_timeout,
                          outside_links=_choice("--outside-links", outside_links, LINK_CHOICES))
    report = run_sync(_fleet(fleet_file, hostfile, ssh_config, include, exclude), paths, options)
    render(report)
    error = report.error()
    if error:
        raise error


def render(report: SyncReport) -> None:
    files = sum(len(item.files) for item in report.items)
    size = sum(item.size for item in report.items)
    print(f"{len(report.items)} path(s), {files:,} file(s), {size / 2**20:,.1f} MiB; {report.shape}")
    table = Table(title="deepfleet sync")
    for column in ("host", "sent", "seconds", "verdict"):
        table.add_column(column, overflow="fold")
    for outcome in report.outcomes:
        verdict = f"[{VERDICT_STYLE[outcome.verdict]}]{outcome.verdict}[/]"
        if outcome.extra:
            verdict += f" ({outcome.extra} extra file(s) kept; --delete removes them)"
        table.add_row(outcome.host, f"{outcome.bytes / 2**20:,.1f} MiB", f"{outcome.seconds:.1f}", verdict)
    Console(width=max(100, Console().width)).print(table)
