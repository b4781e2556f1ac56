"""One host's ranks, started by its agent: what torchrun did for a job, without torchrun's own Python
start and torch import (~1.3 s) in front of every rank.

- Every rank gets torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
  GROUP_RANK, GROUP_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and OMP_NUM_THREADS=1 when unset beside
  other ranks), so any torch.distributed program runs unchanged.
- The rendezvous store: on node 0 the agent binds the master address itself (torch has no option
  for a listen address and binds the wildcard) and hands the listening socket to a small store
  process (`rendezvous_store.py`). TORCHELASTIC_USE_AGENT_STORE=True makes every rank a client of
  it, as under torchrun. The ranks start at once; their torch imports overlap the store's.
- Output: each line gets torchrun's "[rank]:" prefix.
- Failure: the first rank to fail stops the host's other ranks, as torchrun does; a rank that stops
  after its preemption checkpoint (exit 75) does not, since the others are still writing theirs.

Standard library only: the agent must start in milliseconds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from deepfleet.contract import EXIT_PREEMPTED, rank_prefix

LISTEN_BACKLOG = 1024
STORE_MODULE = "deepfleet.launch.rendezvous_store"


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """Where this host's ranks sit in the job: global ranks first_rank .. first_rank + nproc - 1."""
    node_rank: int
    nnodes: int
    nproc: int
    first_rank: int
    world_size: int
    master_addr: str
    master_port: int       # 0 on a lone host: the store's listener picks a free port

    @property
    def hosts_store(self) -> bool:
        return self.node_rank == 0


def rank_env(layout: RankLayout, local_rank: int, *, base: dict[str, str], master_port: int) -> dict[str, str]:
    """One rank's environment: `base` plus torchrun's variables (torch.distributed.run's worker env)."""
    threads = {} if "OMP_NUM_THREADS" in base or layout.nproc == 1 else {"OMP_NUM_THREADS": "1"}
    return {**base, **threads,
            "RANK": str(layout.first_rank + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(layout.world_size), "LOCAL_WORLD_SIZE": str(layout.nproc),
            "GROUP_RANK": str(layout.node_rank), "GROUP_WORLD_SIZE": str(layout.nnodes),
            "ROLE_RANK": str(layout.first_rank + local_rank), "ROLE_WORLD_SIZE": str(layout.world_size),
            "MASTER_ADDR": layout.master_addr, "MASTER_PORT": str(master_port),
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0"}


def listen_address(master_addr: str) -> str:
    """The address the store binds: the master's, when it is an IP literal. A host name is bound on
    every interface, as torchrun does: it may resolve differently on the master (127.0.1.1 on Debian)
    than on the other hosts, and binding there would shut them out."""
    try:
        ipaddress.ip_address(master_addr)
    except ValueError:
        return ""
    return master_addr


def bind_listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if address and ipaddress.ip_address(address).version == 6 else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(LISTEN_BACKLOG)
    return listener


def store_argv(python: str, *, listen_fd: int, host: str, port: int) -> list[str]:
    return [python, "-m", STORE_MODULE, f"--listen-fd={listen_fd}", f"--host={host}", f"--port={port}"]


def shell_exit_code(returncode: int) -> int:
    """A process killed by signal N reports -N; shells and typer expect 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _pump(stream, prefix: bytes, lock: threading.Lock) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line)
            out.flush()


class HostRanks:
    """The store (node 0) and this host's rank processes, and how they ended."""

    def __init__(self, layout: RankLayout, command: list[str], *, env: dict[str, str], cwd: str | None) -> None:
        self.layout = layout
        self.store: subprocess.Popen | None = None
        self.ranks: list[subprocess.Popen] = []
        self.failure: tuple[int | None, int] | None = None   # (global rank, exit code) of the first failure;
                                                              # rank None: the store
        self._pumps: list[threading.Thread] = []
        self._lock = threading.Lock()
        port = layout.master_port
        if layout.hosts_store:
            port = self._start_store(env=env, cwd=cwd)
        for local_rank in range(layout.nproc):
            process = subprocess.Popen(command, env=rank_env(layout, local_rank, base=env, master_port=port), cwd=cwd,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            self.ranks.append(process)
            prefix = rank_prefix(layout.first_rank + local_rank).encode()
            pump = threading.Thread(target=_pump, args=(process.stdout, prefix, self._lock), daemon=True)
            pump.start()
            self._pumps.append(pump)

    def _start_store(self, *, env: dict[str, str], cwd: str | None) -> int:
        address = listen_address(self.layout.master_addr)
        listener = bind_listener(address, self.layout.master_port)
        try:
            port = listener.getsockname()[1]
            self.store = subprocess.Popen(store_argv(sys.executable, listen_fd=listener.fileno(), host=address or
                                                     self.layout.master_addr, port=port),
                                          env=env, cwd=cwd, stdin=subprocess.PIPE, pass_fds=(listener.fileno(),),
                                          start_new_session=True)
        finally:
            listener.close()   # the store process holds its own copy
        return port

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.ranks]

    @property
    def store_pid(self) -> int | None:
        return self.store.pid if self.store else None

    def poll(self) -> int | None:
        """None while a rank runs; then the host's exit code: the first failure's, else 75 when a rank
        stopped after its preemption checkpoint, else 0. Records the first failure as it happens (the
        store ending while ranks run is one: rank None)."""
        codes = [process.poll() for process in self.ranks]
        for rank, code in enumerate(codes, start=self.layout.first_rank):
            if code is not None and code not in (0, EXIT_PREEMPTED) and self.failure is None:
                self.failure = (rank, shell_exit_code(code))
        if self.store and None in codes and self.failure is None and (store_code := self.store.poll()) is not None:
            self.failure = (None, shell_exit_code(store_code) or 1)
        if None in codes:
            return None
        if self.failure:
            return self.failure[1]
        return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0

    @property
    def failed_rank(self) -> int | None:
        return self.failure[0] if self.failure else None

    def close(self) -> None:
        """After the ranks ended: the store told to stop (its stdin closes), output drained."""
        if self.store and self.store.stdin:
            self.store.stdin.close()
        for pump in self._pumps:
            pump.join(timeout=5)
