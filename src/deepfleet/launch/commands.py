"""Per-host command builders (pure): what runs on each host, and how the head starts it.

Supervised, on every host: `python -m deepfleet.launch.host_agent ... -- CMD`. The agent owns the
job's processes on that host and starts its ranks with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...); node 0's agent serves the rendezvous store on the
master's address on the chosen interface only (host_ranks.py). The scripts a user runs by hand
(`launch --backend slurm|manual`) use torchrun itself, bound the same way (bound_torchrun.py).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field



@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One distributed job, as every host's command line needs it."""

    job_id: str
    command: list[str]              # what each rank runs, e.g. [python, -m, deepfleet.train, ...]
    python: str                     # the Python that runs the agent and torchrun on every host
    workdir: str
    master_addr: str
    master_port: int
    nnodes: int
    nproc_per_node: int             # ranks on this host (the job's: on the master host)
    first_rank: int | None = None   # global rank of this host's first rank; None: node rank x nproc_per_node
    world_size: int | None = None   # ranks in the job; None: nnodes x nproc_per_node (hosts alike)
    lifeline_timeout: float = 15.0  # agent tears down by itself after this long without the head
    grace: float = 60.0             # SIGTERM -> SIGKILL on a graceful stop (ranks checkpoint meanwhile)
    env: dict[str, str] = field(default_factory=dict)   # job environment, sent on stdin


def new_job_id() -> str:
    return "df-" + secrets.token_hex(4)


def torchrun_argv(job: JobSpec, *, node_rank: int) -> list[str]:
    return [
        job.python, "-m", "deepfleet.launch.bound_torchrun",
        f"--nnodes={job.nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={job.nproc_per_node}",
        f"--master-addr={job.master_addr}", f"--master-port={job.master_port}",
        "--tee=3", "--no-python", *job.command,
    ]


def agent_argv(job: JobSpec, *, node_rank: int) -> list[str]:
    """The full command for one host, as it runs there (the ssh layer quotes it for the remote shell).

    The process marker is per node, so an agent only ever signals its own node's processes, even
    where hosts share a PID namespace (the namespace test cluster).
    """
    first_rank = node_rank * job.nproc_per_node if job.first_rank is None else job.first_rank
    world_size = job.nnodes * job.nproc_per_node if job.world_size is None else job.world_size
    return [
        job.python, "-m", "deepfleet.launch.host_agent", f"--job-id={job.job_id}.{node_rank}",
        f"--cwd={job.workdir}", f"--lifeline-timeout={job.lifeline_timeout:g}", f"--grace={job.grace:g}",
        f"--nnodes={job.nnodes}", f"--node-rank={node_rank}", f"--nproc={job.nproc_per_node}",
        f"--first-rank={first_rank}", f"--world-size={world_size}",
        f"--master-addr={job.master_addr}", f"--master-port={job.master_port}",
        "--", *job.command,
    ]


def agent_env(job: JobSpec) -> dict[str, str]:
    """Environment for the agent's ranks: the job env, unbuffered so lines reach the head as they are printed."""
    return {**job.env, "PYTHONUNBUFFERED": "1"}
