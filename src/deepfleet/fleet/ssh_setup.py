"""`deepfleet ssh-setup`: one key, installed everywhere, host keys learned, full mesh verified.

Steps: find the head's key and known_hosts for each host where every later ssh looks for them
(`ssh -G`: the user's ssh config decides; where it leaves ssh's defaults, ~/.ssh or --ssh-dir); make the
key if missing;
on every host (in parallel) make that host's key if
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
from deepfleet.fleet.ssh import (RemoteResult, SshOptions, options_for, run_on_host, run_on_hosts, ssh_argv,
                                 ssh_copy_id_line)
from deepfleet.fleet.ssh_effective import HeadSshFiles, effective_head_files

KEY_NAME = "id_ed25519"
HOP_PARALLEL = 8
HEAD = "(head)"

# Runs on each host with the ssh dir as $1 and public keys to authorize on stdin.
_INSTALL_SCRIPT = r'''set -e
d="$1"; case "$d" in "~"*) d="$HOME${d#"~"}";; esac
umask 077; mkdir -p "$d"
if [ ! -f "$d/id_ed25519" ]; then
  # Hosts that share this dir (an NFS home) take turns: ssh-keygen refuses a key another host just made.
  i=0; until mkdir "$d/.deepfleet-keygen" 2>/dev/null || [ $i -ge 100 ]; do i=$((i+1)); sleep 0.1; done
  if [ ! -f "$d/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N "" -C "deepfleet@$(hostname)" -f "$d/id_ed25519" >/dev/null; echo "CHANGED key"
  fi
  rmdir "$d/.deepfleet-keygen" 2>/dev/null || true
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
    ssh_dir: str = "~/.ssh"          # every host's key, authorized_keys and known_hosts
    ssh_dir_given: bool = False      # --ssh-dir: on the head too, in place of ssh's default locations
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


def public_key_of(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def ensure_local_key(key: Path) -> bool:
    """Make `key` (ed25519, no passphrase) unless it exists; True when it was made."""
    if key.exists():
        if not public_key_of(key).exists():
            raise DeepfleetError(f"the ssh key has no public half {public_key_of(key).name}", where=str(key),
                                 fix=f"run `ssh-keygen -y -f {key} > {public_key_of(key)}`")
        return False
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deepfleet@head", "-f", str(key)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DeepfleetError(f"cannot create ssh key: {exc}", where=str(key),
                             fix="check that ssh-keygen is installed and the directory is writable") from None
    return True


async def head_files_for(fleet: Fleet, hosts: list[Host], options: SetupOptions) -> dict[str, HeadSshFiles]:
    """Each host's head-side key and known_hosts: those ssh itself uses for that host (`ssh -G`), with ssh's
    default locations in --ssh-dir when it was given."""
    query = options_for(fleet, identity_file=None, control_dir=None)
    ssh_dir = options.local_dir() if options.ssh_dir_given else None
    found = await asyncio.gather(*(effective_head_files(h, query, ssh_dir=ssh_dir) for h in hosts))
    if fleet.ssh.identity_file:   # every deepfleet ssh passes it with -i, ahead of the config's keys
        found = [replace(f, identity_file=Path(fleet.ssh.identity_file).expanduser()) for f in found]
    return {h.name: files for h, files in zip(hosts, found)}


def setup_ssh_options(fleet: Fleet, files: HeadSshFiles, control_dir: str | None) -> SshOptions:
    """Head -> host options during setup: the host's key and known_hosts, accept-new for host keys."""
    return SshOptions(config_file=fleet.ssh.config_file, identity_file=str(files.identity_file),
                      known_hosts_file=str(files.known_hosts_file), connect_timeout=fleet.ssh.connect_timeout,
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


def _key_lines(keys: list[str]) -> bytes:
    return ("\n".join(keys) + "\n").encode()


async def _check_mesh(fleet: Fleet, hosts: list[Host], options: SetupOptions,
                      head_ssh: dict[str, SshOptions]) -> dict[str, dict[str, bool | None]]:
    hop = hop_options(fleet, options)
    matrix: dict[str, dict[str, bool | None]] = {HEAD: {}}

    async def head_to(target: Host) -> None:
        head_hop = replace(head_ssh[target.name], control_dir=None, reachability_only=True)
        result = await run_on_host(target, ["true"], options=head_hop, timeout=options.timeout)
        matrix[HEAD][target.name] = result.ok

    def params(source: Host) -> bytes:
        hops = {t.name: ssh_argv(t, ["true"], options=hop) for t in hosts}
        return probe_stdin({"mode": "hops", "hops": hops, "hop_timeout": options.timeout / 2,
                            "hop_parallel": HOP_PARALLEL, "network_seconds": 0})

    waves = -(-len(hosts) // HOP_PARALLEL)
    results, _ = await asyncio.gather(
        run_on_hosts(hosts, lambda h: probe_argv(fleet.python_for(h)), options=lambda h: head_ssh[h.name],
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


def _ensure_head_keys(files: dict[str, HeadSshFiles], report: SetupReport) -> dict[str, str]:
    """Make the head's keys that are missing; each host's public key line."""
    for key in sorted({f.identity_file for f in files.values()}):
        if ensure_local_key(key):
            report.changes.append(f"head: created {key}")
    return {name: public_key_of(f.identity_file).read_text().strip() for name, f in files.items()}


async def _install_keys(remote: list[Host], files: dict[str, HeadSshFiles], ssh: dict[str, SshOptions],
                        options: SetupOptions, report: SetupReport) -> list[Host]:
    """The head's key on every host, then every host's key on every host; the hosts that took them."""
    head_pubs = _ensure_head_keys(files, report)
    first = await run_on_hosts(remote, install_argv(options.ssh_dir), options=lambda h: ssh[h.name],
                               timeout=options.timeout, stdin=lambda h: _key_lines([head_pubs[h.name]]))
    reachable, pubkeys = [], list(head_pubs.values())
    for host, result in zip(remote, first):
        pubkey, changes = _parse_install(result)
        if not result.ok or not pubkey:
            report.problems.append(_host_problem(host, result, public_key_of(files[host.name].identity_file)))
            continue
        reachable.append(host)
        pubkeys.append(pubkey)
        report.changes += [f"{host.name}: {c}" for c in changes]
    second = await run_on_hosts(reachable, install_argv(options.ssh_dir), options=lambda h: ssh[h.name],
                                timeout=options.timeout, stdin=_key_lines(sorted(set(pubkeys))))
    for host, result in zip(reachable, second):
        report.changes += [f"{host.name}: {c}" for c in _parse_install(result)[1]]
        if not result.ok:
            report.problems.append(_host_problem(host, result, public_key_of(files[host.name].identity_file)))
    return reachable


def _mesh_problems(matrix: dict[str, dict[str, bool | None]], hosts: list[Host]) -> list[Problem]:
    by_name = {h.name: h for h in hosts}
    return [Problem(what=f"{source} -> {target}: ssh {'did not answer' if ok is None else 'failed'} after setup",
                    where=f"host {source}" if source != HEAD else f"host {target}",
                    fix=f"run `ssh -v {by_name[target].destination}` on {source if source != HEAD else 'the head'} "
                        "to see why (firewall or routing between hosts, sshd AllowUsers, another user there)")
            for source, row in matrix.items() for target, ok in row.items() if not ok]


async def _setup(fleet: Fleet, options: SetupOptions, control_dir: str | None) -> SetupReport:
    report = SetupReport(hosts=list(fleet.hosts))
    remote = [h for h in fleet.hosts if not h.local]
    files = await head_files_for(fleet, remote, options)
    known_hosts = sorted({f.known_hosts_file for f in files.values()})
    before = _digest(known_hosts)
    ssh = {name: setup_ssh_options(fleet, f, control_dir) for name, f in files.items()}
    reachable = await _install_keys(remote, files, ssh, options, report)
    if reachable:
        report.matrix = await _check_mesh(fleet, reachable, options, ssh)
    report.problems += _mesh_problems(report.matrix, reachable)
    if _digest(known_hosts) != before:
        report.changes.append(f"head: learned host keys into {', '.join(map(str, known_hosts))}")
    return report


def run_ssh_setup(fleet: Fleet, options: SetupOptions, *, control_dir: str | None = None) -> SetupReport:
    """Set up the mesh; returns the report (problems included) instead of raising, so it can be shown."""
    return asyncio.run(_setup(fleet, options, control_dir))
