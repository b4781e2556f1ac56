"""What ssh itself uses for a host, from `ssh -G`: the user's ~/.ssh/config (or -F file), its Host and
Match blocks and deepfleet's own -o flags, resolved by ssh. ssh-setup learns host keys into and installs
the key that every later ssh (doctor, train) will use, instead of assuming ~/.ssh.
"""

from __future__ import annotations

import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Host
from deepfleet.fleet.ssh import SshOptions, run_argv, ssh_destination_args, ssh_option_args

DEFAULT_IDENTITY = "~/.ssh/id_ed25519"   # ssh's own default ed25519 key, as `ssh -G` prints it
# %-tokens ssh expands in IdentityFile and UserKnownHostsFile (ssh_config(5) TOKENS) that do not need a
# connection; %C, %k, %j, %T and the like are refused by name instead of guessed.
EXPANDABLE_TOKENS = "%dhilLnpru"


@dataclass(frozen=True, kw_only=True)
class EffectiveSsh:
    """The settings of one `ssh -G` run that ssh-setup needs, as ssh printed them."""
    hostname: str
    user: str
    port: str
    identity_files: tuple[str, ...]      # may hold ~ and %-tokens: ssh expands them only when connecting
    known_hosts_files: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class HeadSshFiles:
    """The head's key and known_hosts for one host: where ssh-setup writes, and what later ssh reads."""
    identity_file: Path
    known_hosts_file: Path


def parse_ssh_g(text: str) -> EffectiveSsh:
    """`ssh -G` output: one lowercase `key value` per line; identityfile repeats, userknownhostsfile is one line
    of space-separated paths."""
    single: dict[str, str] = {}
    identities: list[str] = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "identityfile":
            identities.append(value.strip())
        elif key:
            single.setdefault(key, value.strip())
    return EffectiveSsh(hostname=single.get("hostname", ""), user=single.get("user", ""),
                        port=single.get("port", "22"), identity_files=tuple(identities),
                        known_hosts_files=tuple(single.get("userknownhostsfile", "").split()))


def expand_ssh_path(path: str, *, tokens: Mapping[str, str], home: str) -> str:
    """A path as ssh expands it: a leading `~/` is the home directory, `%x` a token; an unknown token is an error."""
    if path.startswith("~/") or path == "~":
        path = home + path[1:]
    out, index = [], 0
    while index < len(path):
        char = path[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        token = path[index:index + 2]
        if token == "%%":
            out.append("%")
        elif token[1:] and token[1] in tokens:
            out.append(tokens[token[1]])
        else:
            raise DeepfleetError(f"ssh path {path} uses {token}, which deepfleet cannot expand",
                                 where="ssh config", fix=f"write the path without it (tokens it can: "
                                                         f"{', '.join('%' + t for t in EXPANDABLE_TOKENS)})")
        index += 2
    return "".join(out)


def ssh_tokens(effective: EffectiveSsh, *, original_host: str, home: str, local_user: str, uid: int,
               local_hostname: str) -> dict[str, str]:
    return {"d": home, "h": effective.hostname, "i": str(uid), "l": local_hostname,
            "L": local_hostname.split(".")[0], "n": original_host, "p": effective.port, "r": effective.user,
            "u": local_user}


def choose_head_files(effective: EffectiveSsh, tokens: Mapping[str, str], home: str) -> HeadSshFiles:
    """ssh's default ed25519 key when ssh offers it (no IdentityFile configured, or it is listed), else the first
    IdentityFile ssh would offer; host keys go to the first UserKnownHostsFile, the one ssh adds keys to."""
    identities = effective.identity_files or (DEFAULT_IDENTITY,)
    identity = DEFAULT_IDENTITY if DEFAULT_IDENTITY in identities else identities[0]
    known = effective.known_hosts_files[0] if effective.known_hosts_files else "~/.ssh/known_hosts"
    return HeadSshFiles(identity_file=Path(expand_ssh_path(identity, tokens=tokens, home=home)),
                        known_hosts_file=Path(expand_ssh_path(known, tokens=tokens, home=home)))


def in_ssh_dir(files: HeadSshFiles, *, home: str, ssh_dir: Path) -> HeadSshFiles:
    """`files` with ssh's default locations (~/.ssh/id_ed25519, ~/.ssh/known_hosts) moved into `ssh_dir`;
    files the ssh config names stay where they are, since every later ssh reads those."""
    defaults = Path(home) / ".ssh"
    key_name = Path(DEFAULT_IDENTITY).name
    identity = ssh_dir / key_name if files.identity_file == defaults / key_name else files.identity_file
    known = ssh_dir / "known_hosts" if files.known_hosts_file == defaults / "known_hosts" else files.known_hosts_file
    return HeadSshFiles(identity_file=identity, known_hosts_file=known)


def ssh_g_argv(host: Host, options: SshOptions) -> list[str]:
    """`ssh -G` with the flags every deepfleet ssh to `host` passes, so it resolves what they would."""
    return ["ssh", "-G", *ssh_option_args(options), *ssh_destination_args(host)]


async def effective_head_files(host: Host, options: SshOptions, *, ssh_dir: Path | None = None,
                               timeout: float = 10.0) -> HeadSshFiles:
    """Run `ssh -G` for `host` (no connection is made) and pick the head's key and known_hosts from it;
    `ssh_dir` replaces ssh's default locations."""
    code, out, err, timed_out = await run_argv(ssh_g_argv(host, options), timeout=timeout)
    if code != 0 or timed_out:
        last = err.strip().splitlines()[-1] if err.strip() else "timed out" if timed_out else f"exit {code}"
        raise DeepfleetError(f"ssh -G cannot read the ssh config for it: {last}", where=f"host {host.name}",
                             fix=f"fix the ssh config (`ssh -G {host.address}` shows what ssh makes of it)")
    effective = parse_ssh_g(out)
    account = pwd.getpwuid(os.getuid())   # ssh expands ~ from the password database, not $HOME
    tokens = ssh_tokens(effective, original_host=host.address, home=account.pw_dir, local_user=account.pw_name,
                        uid=os.getuid(), local_hostname=socket.gethostname())
    files = choose_head_files(effective, tokens, account.pw_dir)
    return in_ssh_dir(files, home=account.pw_dir, ssh_dir=ssh_dir) if ssh_dir else files
