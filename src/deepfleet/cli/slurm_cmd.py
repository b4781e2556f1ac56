"""`deepfleet status`, `deepfleet logs JOBID`, `deepfleet cancel JOBID`: squeue, the job's log and
scancel for the jobs `deepfleet train --slurm` submitted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deepfleet.errors import DeepfleetError
from deepfleet.launch.slurm_submit import follow, job_state

JOB_NAME_PREFIX = "deepfleet-"
SQUEUE_FIELDS = ("JOBID", "NAME", "STATE", "TIME", "TIME_LIMIT", "NODES", "NODELIST(REASON)")


def _require_slurm_command(name: str) -> None:
    if shutil.which(name) is None:
        raise DeepfleetError(f"{name} not found on PATH", where=name,
                             fix="run on a SLURM login node (or `module load slurm`)")


def _slurm(argv: list[str]) -> subprocess.CompletedProcess:
    _require_slurm_command(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise DeepfleetError(last.split("error:", 1)[-1].strip(), where=" ".join(argv[:2]),
                             fix="check the job id with `deepfleet status`")
    return done


def status() -> None:
    """Your deepfleet jobs in the SLURM queue (squeue --me)."""
    out = _slurm(["squeue", "--me", "-h", "-o", "%i|%j|%T|%M|%l|%D|%R"]).stdout
    rows = [fields for fields in (line.split("|") for line in out.splitlines())
            if len(fields) == len(SQUEUE_FIELDS) and fields[1].startswith(JOB_NAME_PREFIX)]
    table = Table(title="deepfleet jobs")
    for column in SQUEUE_FIELDS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if not rows:
        print("no deepfleet jobs queued or running")


def _log_of(job_id: int) -> Path:
    _require_slurm_command("scontrol")   # job_state asks it
    fields = job_state(job_id)
    if not fields or not fields.get("StdOut"):
        raise DeepfleetError(f"job {job_id} is not known to SLURM (finished jobs are kept a few minutes)",
                             where=f"job {job_id}", fix="its log is output_dir/slurm/job-JOBID.log")
    return Path(fields["StdOut"])


def logs(job_id: int = typer.Argument(..., help="The job id `train --slurm` printed"),
         follow_job: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")) -> None:
    """Print a job's log; --follow keeps printing until the job ends, and exits with its result."""
    log = _log_of(job_id)
    if follow_job:
        raise typer.Exit(code=follow(job_id, log, print))
    print(log.read_text(errors="replace") if log.exists() else f"(no log yet: {log})", end="")


def cancel(job_id: int = typer.Argument(..., help="The job id `train --slurm` printed")) -> None:
    """Cancel a job (scancel): every node's processes are stopped; the newest checkpoint stays."""
    _slurm(["scancel", str(job_id)])
    print(f"cancelled job {job_id}")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
