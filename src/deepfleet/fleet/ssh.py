"""OpenSSH transport: pure argv builders, failure diagnosis, and a parallel asyncio runner.

The system `ssh` client is used (not a library) so the user's ~/.ssh/config, agent, ProxyJump
and ControlMaster all apply. It always runs with BatchMode=yes, so it never prompts, and never
with StrictHostKeyChecking=no.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from deepfleet.fleet.inventory import Fleet, Host, SshSettings, host_name_problem, user_problem

HostKeyPolicy = Literal["yes", "accept-new"]
# sun_path holds 104 bytes on macOS (108 on Linux). The socket path is <dir>/<%C: 40 hex> and
# ssh first binds it with a ".<17 random chars>" suffix. A longer ControlPath makes ssh fail
# outright, so a too-long control dir means no multiplexing instead.
UNIX_SOCKET_PATH_MAX = 104
CONTROL_PATH_EXTRA = len("/") + 40 + len(".") + 17


@dataclass(frozen=True, kw_only=True)
class SshOptions:
    config_file: str | None = None
    identity_file: str | None = None
    known_hosts_file: str | None = None
    connect_timeout: float = 5.0
    control_dir: str | None = None           # ControlMaster sockets; None: no multiplexing
    control_persist_seconds: int = 60
    host_key_policy: HostKeyPolicy = "yes"   # accept-new only during ssh-setup
    identities_only: bool = False
    reachability_only: bool = False          # a login that runs `true`: see ssh_option_args

    @classmethod
    def from_settings(cls, settings: SshSettings, **overrides) -> "SshOptions":
        values = dict(config_file=settings.config_file, identity_file=settings.identity_file,
                      known_hosts_file=settings.known_hosts_file, connect_timeout=settings.connect_timeout,
                      control_dir=default_control_dir())
        values.update(overrides)
        return cls(**values)


def default_control_dir() -> str:
    # Unix socket paths are limited to ~100 bytes: keep the directory short; %C is a short hash.
    return str(Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "deepfleet-ssh")


PQ_HYBRID_KEX = "sntrup761x25519-sha512*"


def ssh_option_args(options: SshOptions) -> list[str]:
    """The ssh flags deepfleet always passes (shared by head->host and host->host commands)."""
    if options.host_key_policy not in ("yes", "accept-new"):
        raise ValueError(f"host key policy {options.host_key_policy!r} is not allowed")
    args: list[str] = []
    if options.config_file:
        args += ["-F", options.config_file]
    args += ["-o", "BatchMode=yes",
             "-o", f"ConnectTimeout={max(1, round(options.connect_timeout))}",
             "-o", f"StrictHostKeyChecking={options.host_key_policy}",
             "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if options.identity_file:
        args += ["-i", options.identity_file]
    if options.identities_only:
        args += ["-o", "IdentitiesOnly=yes"]
    if options.known_hosts_file:
        args += ["-o", f"UserKnownHostsFile={options.known_hosts_file}"]
    if options.reachability_only:
        # Nothing travels over it, so skip the post-quantum hybrid key exchange (OpenSSH 9.x's
        # default), which costs ~70 ms of CPU per login: 3x the whole rest of a login, N(N-1) times.
        args += ["-o", f"KexAlgorithms=-{PQ_HYBRID_KEX}"]
    if options.control_dir and len(options.control_dir) + CONTROL_PATH_EXTRA < UNIX_SOCKET_PATH_MAX:
        args += ["-o", "ControlMaster=auto", "-o", f"ControlPath={options.control_dir}/%C",
                 "-o", f"ControlPersist={options.control_persist_seconds}"]
    return args


def ssh_destination_args(host: Host) -> list[str]:
    """`-p PORT -l USER -- ADDRESS`, once the address and user are known to be safe to pass."""
    for problem in (host_name_problem(host.address), host.user and user_problem(host.user)):
        if problem:
            raise ValueError(problem)
    args = ["-p", str(host.port)] if host.port else []
    if host.user:
        args += ["-l", host.user]
    return args + ["--", host.address]


def ssh_argv(host: Host, remote_argv: Sequence[str], *, options: SshOptions) -> list[str]:
    """argv that runs `remote_argv` on `host`; each word is shell-quoted for the remote shell."""
    return ["ssh", *ssh_option_args(options), *ssh_destination_args(host), shlex.join(remote_argv)]


def srun_argv(host: Host, remote_argv: Sequence[str]) -> list[str]:
    """argv that runs `remote_argv` as a one-task step on `host`'s node of the SLURM allocation this
    process runs in. srun execs the argv itself (no remote shell, nothing to quote); `--overlap`
    lets the steps of one job share the nodes' CPUs and memory, as the agents and probes do."""
    problem = host_name_problem(host.name)
    if problem:
        raise ValueError(problem)
    return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host.name}", "--overlap", "--quiet",
            "--kill-on-bad-exit=1", "--", *remote_argv]


def host_argv(host: Host, remote_argv: Sequence[str], *, options: SshOptions) -> list[str]:
    """Run locally for the local host, as a job step on a node of the SLURM allocation, over ssh otherwise."""
    if host.local:
        return list(remote_argv)
    return srun_argv(host, remote_argv) if host.via_srun else ssh_argv(host, remote_argv, options=options)


def ssh_copy_id_line(host: Host, public_key: str) -> str:
    port = ["-p", str(host.port)] if host.port else []
    return shlex.join(["ssh-copy-id", "-i", public_key, *port, host.destination])


@dataclass(frozen=True, kw_only=True)
class SshFailure:
    kind: Literal["unreachable", "timeout", "auth", "password", "host-key-changed", "host-key-unknown",
                  "dns", "remote"]
    what: str
    fix: str


def diagnose(host: Host, returncode: int | None, stderr: str, *, timed_out: bool,
             options: SshOptions) -> SshFailure | None:
    """What went wrong with an ssh call, from its exit code and stderr; None for a remote failure."""
    known_hosts = options.known_hosts_file or "~/.ssh/known_hosts"
    text = stderr.lower()
    if timed_out:
        return SshFailure(kind="timeout", what="timed out", fix="check that the host is up and not overloaded")
    if returncode != 255:
        return None
    if "remote host identification has changed" in text:
        return SshFailure(kind="host-key-changed", what="host key CHANGED since it was recorded",
                          fix=f"if the host was reinstalled, confirm its new key with the admin, then run "
                              f"`ssh-keygen -R {host.address} -f {known_hosts}` and `deepfleet ssh-setup`")
    if "host key verification failed" in text or "no ed25519 host key is known" in text:
        return SshFailure(kind="host-key-unknown", what="host key not in known_hosts",
                          fix=f"run `deepfleet ssh-setup --hosts {host.address}` to learn it (accept-new)")
    if "could not resolve hostname" in text or "name or service not known" in text:
        return SshFailure(kind="dns", what="host name does not resolve",
                          fix="fix the name in the fleet, or add it to /etc/hosts or DNS")
    if "permission denied" in text:
        methods = re.search(r"permission denied \(([^)]*)\)", text)
        offered = methods.group(1) if methods else ""
        if offered and "publickey" not in offered:
            return SshFailure(kind="password", what=f"host accepts only {offered} (BatchMode never types a password)",
                              fix="enable PubkeyAuthentication on the host, or run the ssh-copy-id line from ssh-setup")
        user = host.user or os.environ.get("USER", "your user")
        return SshFailure(kind="password" if "password" in offered else "auth",
                          what=f"key not accepted for user {user!r}",
                          fix=f"check the user name, or run `deepfleet ssh-setup --hosts {host.destination}` "
                              f"(it prints the ssh-copy-id line when a password is needed)")
    if "timed out" in text:
        return SshFailure(kind="unreachable", what="connection timed out",
                          fix="check the address, routing and firewall between head and host")
    if "connection refused" in text:
        return SshFailure(kind="unreachable", what="connection refused (no sshd listening)",
                          fix="start sshd on the host (`sudo systemctl start ssh`) or fix the port")
    if "no route to host" in text or "network is unreachable" in text:
        return SshFailure(kind="unreachable", what="no route to host",
                          fix="the host is down or in a network the head cannot reach")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "ssh exited with 255"
    return SshFailure(kind="unreachable", what=last, fix="run the printed ssh command by hand with -v")


@dataclass(frozen=True, kw_only=True)
class RemoteResult:
    host: Host
    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    failure: SshFailure | None = None
    started_at: float = 0.0          # head wall clock when this host's ssh started

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


async def run_argv(argv: Sequence[str], *, stdin: bytes | None = None, timeout: float,
                   env: dict[str, str] | None = None) -> tuple[int | None, str, str, bool]:
    """Run argv with a hard timeout; on timeout the whole process group is killed."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), False
    except asyncio.TimeoutError:
        _kill_group(process.pid)
        try:
            out, err = await asyncio.wait_for(process.communicate(), 2)
        except asyncio.TimeoutError:
            out, err = b"", b""
        return None, out.decode(errors="replace"), err.decode(errors="replace"), True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_on_host(host: Host, remote_argv: Sequence[str], *, options: SshOptions, timeout: float,
                      stdin: bytes | None = None) -> RemoteResult:
    argv = host_argv(host, remote_argv, options=options)
    over_ssh = not (host.local or host.via_srun)
    if options.control_dir and over_ssh:
        Path(options.control_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    started, started_at = time.monotonic(), time.time()
    code, out, err, timed_out = await run_argv(argv, stdin=stdin, timeout=timeout)
    failure = diagnose(host, code, err, timed_out=timed_out, options=options) if over_ssh else None
    return RemoteResult(host=host, argv=argv, returncode=code, stdout=out, stderr=err,
                        seconds=time.monotonic() - started, timed_out=timed_out, failure=failure,
                        started_at=started_at)


async def run_on_hosts(hosts: Sequence[Host], remote_argv: Callable[[Host], Sequence[str]] | Sequence[str], *,
                       options: Callable[[Host], SshOptions] | SshOptions, timeout: float,
                       stdin: Callable[[Host], bytes | None] | bytes | None = None,
                       on_done: Callable[[RemoteResult], None] | None = None) -> list[RemoteResult]:
    """Run on every host at once; results in host order. Per-host argv/options/stdin may be functions;
    `on_done` is called as each host finishes."""
    def pick(value, host):
        return value(host) if callable(value) else value

    async def one(host: Host) -> RemoteResult:
        result = await run_on_host(host, pick(remote_argv, host), options=pick(options, host), timeout=timeout,
                                   stdin=pick(stdin, host))
        if on_done:
            on_done(result)
        return result
    return list(await asyncio.gather(*(one(host) for host in hosts)))


def options_for(fleet: Fleet, **overrides) -> SshOptions:
    return SshOptions.from_settings(fleet.ssh, **overrides)
