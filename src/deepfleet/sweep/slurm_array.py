"""`deepfleet sweep --slurm`: one SLURM job array, one array task per trial still to run (`%K` keeps at
most `--parallel` K running at once), each task the same `deepfleet train` in its allocation as
`train --slurm` runs, with the same SIGTERM forwarding and requeue. Each task records how its trial
ended in status/<id>.json, which the sweep reads once the array is over to rank the trials."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import BatchRequest, background_lines, write_and_submit
from deepfleet.launch.slurm_submit import request_problems, require_sbatch, sbatch_lines, submit
from deepfleet.sweep.sweep_dir import DONE, FAILED, INTERRUPTED


def status_lines() -> list[str]:
    """Shell lines that write the task's trial status (TrialStatus's fields) from $code to $status."""
    return [f'case "$code" in 0) state={DONE} ;; {EXIT_PREEMPTED}) state={INTERRUPTED} ;; *) state={FAILED} ;; esac',
            'mkdir -p "$(dirname "$status")" && '
            'printf \'{"status": "%s", "exit_code": %d, "started": %d, "seconds": %d}\\n\' '
            '"$state" "$code" "$started" "$(($(date +%s) - started))" > "$status.tmp" && mv "$status.tmp" "$status"']


def array_script(request: BatchRequest, *, job_name: str, workdir: str, log_pattern: str,
                 tasks: Sequence[tuple[Path, Sequence[str]]], parallel: int) -> str:
    """The job array's batch script: task i runs tasks[i]'s argv and writes its status file."""
    throttle = f"%{parallel}" if parallel < len(tasks) else ""
    lines = sbatch_lines(request, job_name=job_name, workdir=workdir, log_pattern=log_pattern,
                         extra=[f"--array=0-{len(tasks) - 1}{throttle}"])
    lines += ["# Written by `deepfleet sweep --slurm`: array task i trains trial i. SIGTERM (preemption, the time",
              f"# limit, scancel) makes it write a checkpoint and exit {EXIT_PREEMPTED}; requeued, it resumes there.",
              'case "$SLURM_ARRAY_TASK_ID" in']
    for index, (status, argv) in enumerate(tasks):
        lines.append(f"  {index}) status={shlex.quote(str(status))}; set -- {shlex.join(argv)} ;;")
    lines += ['  *) echo "deepfleet sweep: no trial for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
              "started=$(date +%s)"]
    return "\n".join([*lines, *background_lines('"$@"', before_exit=status_lines()), ""])


def array_tasks_left(job_id: int) -> int | None:
    """Tasks of the array still queued or running (squeue), or None when squeue cannot say."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:   # squeue refuses a job id it no longer knows: the array is over
        return 0 if "Invalid job id" in done.stderr else None
    return len([line for line in done.stdout.splitlines() if line.strip()])


def check_slurm_request(request: BatchRequest) -> None:
    """What can be refused before the sweep writes anything: no sbatch here, a time limit too short."""
    require_sbatch()
    problems = request_problems(request, partition_gpus=None)
    if problems:
        raise DeepfleetError(problems=problems)


def run_array(request: BatchRequest, *, script: Path, text: str, write: Callable[[str], None],
              poll: float = 2.0) -> int:
    """Submit the array (check_slurm_request first) and wait until none of its tasks is left; its job id."""
    job_id = write_and_submit(text, script, lambda path: submit(path, request))
    write(f"submitted job array {job_id} ({script}); logs: {script.parent}/job-{job_id}_<task>.log")
    try:
        while (left := array_tasks_left(job_id)) != 0:
            if left is None:
                raise DeepfleetError(f"squeue cannot tell whether job array {job_id} is over", where="squeue",
                                     fix=f"check `squeue -j {job_id}`; when it is over, run the same sweep command "
                                         "again without --slurm to see the results", exit_code=1)
            time.sleep(poll)
    except KeyboardInterrupt:
        write(f"detached; job array {job_id} keeps running (deepfleet cancel {job_id} stops it)")
        raise
    return job_id
