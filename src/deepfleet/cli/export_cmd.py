"""`deepfleet export`: a training checkpoint -> one HF model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    run_dir: Path = typer.Argument(..., help="A run's output_dir (with checkpoints/step-N/)"),
    to: Path = typer.Option(..., "--to", help="Where to write the HF model dir"),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest complete one)"),
    merge: bool = typer.Option(False, "--merge", help="LoRA runs: fold the adapter into a full model"),
) -> None:
    """Turn any complete checkpoint (ZeRO 0-3, any world size) into one HF model dir of safetensors."""
    from deepfleet.train.export import export_checkpoint

    print(f"exported {export_checkpoint(run_dir, to=to, step=step, merge=merge)}")
