"""`deepfleet export`: a training checkpoint -> one HF model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deepfleet.cli.fleet_cmd import FleetOpt, HostfileOpt


def export(
    run_dir: Path = typer.Argument(..., help="A run's output_dir (with checkpoints/step-N/)"),
    to: Path = typer.Option(..., "--to", help="Where to write the HF model dir"),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest complete one)"),
    merge: bool = typer.Option(False, "--merge", help="LoRA runs: fold the adapter into a full model"),
    fleet: Optional[str] = FleetOpt, hostfile: Optional[str] = HostfileOpt,
) -> None:
    """Turn any complete checkpoint (ZeRO 0-3, any world size) into one HF model dir of safetensors.

    When output_dir was not shared, each host kept its own ranks' shards: with a fleet (--fleet,
    --hostfile or ./fleet.yaml) the missing ones are collected over ssh and verified first."""
    from deepfleet.fleet.sources import resolve_fleet
    from deepfleet.launch.training import is_local_only
    from deepfleet.spread_export import export_run

    hosts = resolve_fleet(fleet_file=fleet, hostfile=hostfile)
    exported, collected = export_run(run_dir, to=to, step=step, merge=merge,
                                     fleet=None if is_local_only(hosts) else hosts)
    for line in collected:
        print(line)
    print(f"exported {exported}")
