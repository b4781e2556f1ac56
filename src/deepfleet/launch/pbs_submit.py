"""`deepfleet train --pbs`: a PBS Pro / OpenPBS job whose script runs `deepfleet train` inside the
allocation (which reads PBS_NODEFILE and reaches the nodes over ssh), submitted with qsub.

The chunks ask for `mpiprocs` = GPUs per node, so PBS_NODEFILE lists each node once per GPU and
the training starts one rank per GPU. PBS gives no warning before the walltime (it sends SIGTERM,
then SIGKILL `kill_delay` seconds later), so the script sends the training SIGTERM itself
`grace_seconds` before the walltime; that SIGTERM, like a qdel's or a preemption's, makes it write a
checkpoint and exit 75. The job is rerunnable (`-r y`); submitted again, the training resumes.
There is no PBS server on the test machines: the script is tested as text and by running its body.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from deepfleet.contract import EXIT_PREEMPTED
from deepfleet.errors import DeepfleetError
from deepfleet.launch.batch_job import (BatchRequest, in_job_train_argv, time_limit_seconds, time_problems,
                                        training_lines, write_and_submit)


def walltime(text: str) -> str:
    """PBS's HH:MM:SS (hours may pass 24) from any accepted time limit."""
    seconds = time_limit_seconds(text)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def select_statement(request: BatchRequest) -> str:
    """One chunk per node, each with its GPUs and one MPI process (nodefile line) per GPU."""
    gpus = request.gpus_per_node
    return f"select={request.nodes}" + (f":ngpus={gpus}" if gpus else "") + f":mpiprocs={max(gpus, 1)}"


def qsub_script(request: BatchRequest, *, job_name: str, workdir: str, log_dir: str,
                train_argv: Sequence[str]) -> str:
    """The qsub script: PBS lines, the job's output appended to log_dir/job-ID.log, then the training."""
    options = [("-N", job_name[:236]), ("-l", select_statement(request)), ("-l", "place=scatter:excl"),
               ("-r", "y"), ("-j", "oe"), ("-o", f"{log_dir}/pbs-output.log")]
    options += [("-l", f"walltime={walltime(request.time)}")] if request.time else []
    options += [("-q", request.partition)] if request.partition else []
    options += [("-A", request.account)] if request.account else []
    term_after = time_limit_seconds(request.time) - request.grace_seconds if request.time else None
    log = shlex.quote(log_dir) + '/job-"${PBS_JOBID%%.*}".log'
    return "\n".join([
        "#!/bin/bash",
        *(f"#PBS {flag} {shlex.quote(value)}" for flag, value in options),
        "# Written by `deepfleet train --pbs`. SIGTERM (the script's own before the walltime, qdel, preemption)",
        f"# makes the training write a checkpoint and exit {EXIT_PREEMPTED}; submitted again, it resumes there.",
        f"cd {shlex.quote(workdir)}",
        f"exec >>{log} 2>&1",
        *training_lines(train_argv, term_after=term_after),
        ""])


def submit(script: Path, request: BatchRequest) -> str:
    """qsub's job id (e.g. `1234.server`), or its refusal as one line."""
    done = subprocess.run(["qsub", str(script)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        what = (done.stderr.strip().splitlines() or [f"qsub exited {done.returncode}"])[-1].removeprefix("qsub: ")
        if "queue" in what.lower() and request.partition:
            raise DeepfleetError(what, where=f"--partition {request.partition}", fix="see `qstat -Q` for the queues")
        raise DeepfleetError(what, where="qsub", fix="check the --pbs options against `qstat -Q`")
    return done.stdout.strip()


def train_on_pbs(request: BatchRequest, *, train_args: Sequence[str], output_dir: Path, dry_run: bool = False,
                 write: Callable[[str], None] = print) -> int:
    """Check, write `output_dir/pbs/train.pbs` and submit it (or print it with `dry_run`)."""
    if not dry_run and shutil.which("qsub") is None:
        raise DeepfleetError("qsub not found on PATH", where="--pbs",
                             fix="run on a PBS login node (or `module load pbs`), or train with --fleet")
    problems = time_problems(request)
    if problems:
        raise DeepfleetError(problems=problems)
    pbs_dir = output_dir / "pbs"
    text = qsub_script(request, job_name=f"deepfleet-{output_dir.name}", workdir=str(Path.cwd()), log_dir=str(pbs_dir),
                       train_argv=in_job_train_argv(train_args))
    if dry_run:
        write(text)
        return 0
    script = pbs_dir / "train.pbs"
    job_id = write_and_submit(text, script, lambda path: submit(path, request))
    write(f"submitted job {job_id} ({script}); log: {pbs_dir}/job-{job_id.split('.')[0]}.log")
    write(f"see it: qstat -x {job_id}; stop it: qdel {job_id}; after exit {EXIT_PREEMPTED}, `qsub {script}` resumes")
    return 0
