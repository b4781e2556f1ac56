"""`deepfleet ssh-setup`: one key, installed everywhere, host keys learned, full mesh verified.

Steps: make the head's key if missing; on every host (in parallel) make that host's key if
missing and install the head's key; install every host's key on every host; then each host
ssh's to every host (itself included, as DeepSpeed's launcher does) with accept-new, which
records host keys and proves both directions. Only missing lines are ever appended, so a
second run changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.facts import probe_argv, probe_stdin
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.ssh import RemoteResult, SshOptions, run_on_host, run_on_hosts, ssh_argv, ssh_copy_id_line

KEY_NAME = "id_ed25519"
HOP_PARALLEL = 8
HEAD = "(head)"

# Runs on each host with the ssh dir as $1 and public keys to authorize on stdin.
_INSTALL_SCRIPT = r'''set -e
d="$1"; case "$d" in "~"*) d="$HOME${d#"~"}";; esac
umask 077; mkdir -p "$d"
if [ ! -f "$d/id_ed25519" ]; then
  ssh-keygen -q -t ed25519 -N "" -C "deepfleet@$(hostname)" -f "$d/id_ed25519" >/dev/null; echo "CHANGED key"
fi
touch "$d/authorized_keys"
while IFS= read -r line; do
  [ -n "$line" ] || continue
  grep -qxF "$line" "$d/authorized_keys" || { printf '%s\n' "$line" >> "$d/authorized_keys"; echo "CHANGED authorized_keys"; }
done
echo "PUBKEY $(cat "$d/id_ed25519.pub")"
'''


@dataclass(frozen=True, kw_only=True)
class SetupOptions:
    ssh_dir: str = "~/.ssh"          # same meaning on the head and on every host
    timeout: float = 30.0

    def local_dir(self) -> Path:
        return Path(self.ssh_dir).expanduser()


@dataclass(kw_only=True)
class SetupReport:
    hosts: list[Host]
    matrix: dict[str, dict[str, bool | None]] = field(default_factory=dict)  # source -> target -> ok
    changes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def install_argv(ssh_dir: str) -> list[str]:
    return ["sh", "-c", _INSTALL_SCRIPT, "sh", ssh_dir]


def ensure_local_key(options: SetupOptions) -> tuple[Path, bool]:
    directory = options.local_dir()
    key = directory / KEY_NAME
    if key.exists():
        return key, False
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deepfleet@head", "-f", str(key)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DeepfleetError(f"cannot create ssh key: {exc}", where=str(key),
                             fix="check that ssh-keygen is installed and the directory is writable") from None
    return key, True


def setup_ssh_options(fleet: Fleet, options: SetupOptions, control_dir: str | None) -> SshOptions:
    """Head -> host options during setup: our key and known_hosts, accept-new for host keys."""
    base = options.local_dir()
    return SshOptions(config_file=fleet.ssh.config_file, identity_file=str(base / KEY_NAME),
                      known_hosts_file=str(base / "known_hosts"), connect_timeout=fleet.ssh.connect_timeout,
                      control_dir=control_dir, host_key_policy="accept-new")


def hop_options(fleet: Fleet, options: SetupOptions) -> SshOptions:
    """Host -> host options: that host's own key and known_hosts under the same ssh dir."""
    return SshOptions(config_file=fleet.ssh.config_file, identity_file=f"{options.ssh_dir}/{KEY_NAME}",
                      known_hosts_file=f"{options.ssh_dir}/known_hosts", connect_timeout=fleet.ssh.connect_timeout,
                      host_key_policy="accept-new", reachability_only=True)


def _parse_install(result: RemoteResult) -> tuple[str | None, list[str]]:
    pubkey, changes = None, []
    for line in result.stdout.splitlines():
        if line.startswith("PUBKEY "):
            pubkey = line[len("PUBKEY "):].strip()
        elif line.startswith("CHANGED "):
            changes.append(line[len("CHANGED "):].strip())
    return pubkey, changes


def _host_problem(host: Host, result: RemoteResult, public_key: Path) -> Problem:
    if result.failure and result.failure.kind == "password":
        return Problem(what=f"needs a password ({result.failure.what})", where=f"host {host.name}",
                       fix=f"run `{ssh_copy_id_line(host, str(public_key))}` once, then ssh-setup again")
    if result.failure and result.failure.kind == "auth":
        return Problem(what=result.failure.what, where=f"host {host.name}",
                       fix=f"check the user name; if it is right, run `{ssh_copy_id_line(host, str(public_key))}` "
                           "once (it asks for the password), then ssh-setup again")
    if result.failure:
        return Problem(what=result.failure.what, where=f"host {host.name}", fix=result.failure.fix)
    return Problem(what=f"key install failed: {result.stderr.strip()[-200:] or 'no output'}",
                   where=f"host {host.name}", fix="check that ssh-keygen and a writable home dir exist there")


async def _install(hosts: list[Host], keys: list[str], ssh_dir: str, ssh: SshOptions,
                   timeout: float) -> list[RemoteResult]:
    payload = ("\n".join(keys) + "\n").encode()
    return await run_on_hosts(hosts, install_argv(ssh_dir), options=ssh, timeout=timeout, stdin=payload)


async def _check_mesh(fleet: Fleet, hosts: list[Host], options: SetupOptions, head_ssh: SshOptions,
                      ) -> dict[str, dict[str, bool | None]]:
    hop = hop_options(fleet, options)
    head_hop = replace(head_ssh, control_dir=None, reachability_only=True)
    matrix: dict[str, dict[str, bool | None]] = {HEAD: {}}

    async def head_to(target: Host) -> None:
        result = await run_on_host(target, ["true"], options=head_hop, timeout=options.timeout)
        matrix[HEAD][target.name] = result.ok

    def params(source: Host) -> bytes:
        hops = {t.name: ssh_argv(t, ["true"], options=hop) for t in hosts}
        return probe_stdin({"mode": "hops", "hops": hops, "hop_timeout": options.timeout / 2,
                            "hop_parallel": HOP_PARALLEL, "network_seconds": 0})

    waves = -(-len(hosts) // HOP_PARALLEL)
    results, _ = await asyncio.gather(
        run_on_hosts(hosts, lambda h: probe_argv(fleet.python_for(h)), options=head_ssh,
                     timeout=options.timeout / 2 * waves + 10, stdin=params),
        asyncio.gather(*(head_to(t) for t in hosts)))
    for source, result in zip(hosts, results):
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        hops = json.loads(lines[-1])["hops"] if result.ok and lines else {}
        matrix[source.name] = {t.name: (hops[t.name]["returncode"] == 0) if t.name in hops else None
                               for t in hosts}
    return matrix


def _digest(paths: list[Path]) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() if p.exists() else b"-" for p in paths)).hexdigest()


async def _setup(fleet: Fleet, options: SetupOptions, control_dir: str | None) -> SetupReport:
    report = SetupReport(hosts=list(fleet.hosts))
    key, created = ensure_local_key(options)
    if created:
        report.changes.append(f"head: created {key}")
    head_pub = key.with_suffix(".pub").read_text().strip()
    ssh = setup_ssh_options(fleet, options, control_dir)
    remote = [h for h in fleet.hosts if not h.local]
    first = await _install(remote, [head_pub], options.ssh_dir, ssh, options.timeout)
    reachable, pubkeys = [], [head_pub]
    for host, result in zip(remote, first):
        pubkey, changes = _parse_install(result)
        if not result.ok or not pubkey:
            report.problems.append(_host_problem(host, result, key.with_suffix(".pub")))
            continue
        reachable.append(host)
        pubkeys.append(pubkey)
        report.changes += [f"{host.name}: {c}" for c in changes]
    second = await _install(reachable, sorted(set(pubkeys)), options.ssh_dir, ssh, options.timeout)
    for host, result in zip(reachable, second):
        report.changes += [f"{host.name}: {c}" for c in _parse_install(result)[1]]
        if not result.ok:
            report.problems.append(_host_problem(host, result, key.with_suffix(".pub")))
    if reachable:
        report.matrix = await _check_mesh(fleet, reachable, options, ssh)
    by_name = {h.name: h for h in reachable}
    for source, row in report.matrix.items():
        for target, ok in row.items():
            if not ok:
                report.problems.append(Problem(
                    what=f"{source} -> {target}: ssh {'did not answer' if ok is None else 'failed'} after setup",
                    where=f"host {source}" if source != HEAD else f"host {target}",
                    fix=f"run `ssh -v {by_name[target].destination}` on {source if source != HEAD else 'the head'} "
                        "to see why (firewall or routing between hosts, sshd AllowUsers, another user there)"))
    return report


def run_ssh_setup(fleet: Fleet, options: SetupOptions, *, control_dir: str | None = None) -> SetupReport:
    """Set up the mesh; returns the report (problems included) instead of raising, so it can be shown."""
    local_dir = options.local_dir()
    watched = [local_dir / KEY_NAME, local_dir / "known_hosts", local_dir / "authorized_keys"]
    before = _digest(watched)
    report = asyncio.run(_setup(fleet, options, control_dir))
    if _digest(watched) != before and not any(c.startswith("head:") for c in report.changes):
        report.changes.append("head: learned host keys into known_hosts")
    return report
