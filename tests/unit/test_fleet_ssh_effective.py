"""`ssh -G`: the key and known_hosts ssh-setup uses are the ones every later ssh uses."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from pathlib import Path

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Host
from deepfleet.fleet.ssh import SshOptions
from deepfleet.fleet.ssh_effective import (HeadSshFiles, choose_head_files, effective_head_files, expand_ssh_path,
                                           in_ssh_dir, parse_ssh_g, ssh_g_argv)

DEFAULTS = """user alice
hostname gpu1.example
port 22
identityfile ~/.ssh/id_rsa
identityfile ~/.ssh/id_ecdsa
identityfile ~/.ssh/id_ed25519
identityfile ~/.ssh/id_dsa
globalknownhostsfile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2
userknownhostsfile /home/alice/.ssh/known_hosts /home/alice/.ssh/known_hosts2
"""
CONFIGURED = """user bob
hostname 10.0.0.7
port 2222
identityfile ~/keys/%h-%r
identityfile /opt/fallback_key
userknownhostsfile /srv/cluster/known_hosts /home/alice/.ssh/known_hosts
"""
TOKENS = {"d": "/home/alice", "h": "10.0.0.7", "r": "bob", "p": "2222", "u": "alice", "n": "gpu7", "i": "1000",
          "l": "head.example", "L": "head"}


def test_parse_ssh_g_keeps_every_identity_and_known_hosts_file_in_order():
    effective = parse_ssh_g(CONFIGURED)
    assert effective.identity_files == ("~/keys/%h-%r", "/opt/fallback_key")
    assert effective.known_hosts_files == ("/srv/cluster/known_hosts", "/home/alice/.ssh/known_hosts")
    assert (effective.hostname, effective.user, effective.port) == ("10.0.0.7", "bob", "2222")


def test_default_config_means_the_default_key_and_known_hosts():
    files = choose_head_files(parse_ssh_g(DEFAULTS), TOKENS, "/home/alice")
    assert files == HeadSshFiles(identity_file=Path("/home/alice/.ssh/id_ed25519"),
                                 known_hosts_file=Path("/home/alice/.ssh/known_hosts"))


def test_configured_files_win_first_entry_first():
    files = choose_head_files(parse_ssh_g(CONFIGURED), TOKENS, "/home/alice")
    assert files == HeadSshFiles(identity_file=Path("/home/alice/keys/10.0.0.7-bob"),
                                 known_hosts_file=Path("/srv/cluster/known_hosts"))


def test_ssh_dir_replaces_only_ssh_defaults():
    ssh_dir = Path("/shared/ssh")
    default = choose_head_files(parse_ssh_g(DEFAULTS), TOKENS, "/home/alice")
    assert in_ssh_dir(default, home="/home/alice", ssh_dir=ssh_dir) == HeadSshFiles(
        identity_file=ssh_dir / "id_ed25519", known_hosts_file=ssh_dir / "known_hosts")
    configured = choose_head_files(parse_ssh_g(CONFIGURED), TOKENS, "/home/alice")
    assert in_ssh_dir(configured, home="/home/alice", ssh_dir=ssh_dir) == configured


def test_expansion_of_tokens_and_refusal_of_ones_that_need_a_connection():
    assert expand_ssh_path("%d/.ssh/%u@%L_%p%%", tokens=TOKENS, home="/home/alice") == \
        "/home/alice/.ssh/alice@head_2222%"
    with pytest.raises(DeepfleetError, match="uses %C"):
        expand_ssh_path("~/.ssh/cm-%C", tokens=TOKENS, home="/home/alice")


def test_ssh_g_argv_passes_the_same_flags_as_every_ssh():
    host = Host(name="gpu1", address="10.0.0.7", user="bob", port=2222)
    argv = ssh_g_argv(host, SshOptions(config_file="/etc/df_ssh_config", known_hosts_file="/kh"))
    assert argv[:4] == ["ssh", "-G", "-F", "/etc/df_ssh_config"]
    assert "UserKnownHostsFile=/kh" in argv
    assert argv[-6:] == ["-p", "2222", "-l", "bob", "--", "10.0.0.7"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_real_ssh_g_reads_a_host_block(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host gpu*\n  IdentityFile {tmp_path}/keys/%h_key\n"
                      f"  UserKnownHostsFile {tmp_path}/kh/known other_known\n")
    options = SshOptions(config_file=str(config))
    files = asyncio.run(effective_head_files(Host(name="gpu3", address="gpu3"), options))
    assert files == HeadSshFiles(identity_file=tmp_path / "keys" / "gpu3_key", known_hosts_file=tmp_path / "kh" / "known")
    other = asyncio.run(effective_head_files(Host(name="cpu1", address="cpu1"), options))
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert other == HeadSshFiles(identity_file=Path(home) / ".ssh" / "id_ed25519",
                                 known_hosts_file=Path(home) / ".ssh" / "known_hosts")


def test_unreadable_ssh_config_is_one_error_naming_the_host(tmp_path):
    options = SshOptions(config_file=str(tmp_path / "missing_config"))
    with pytest.raises(DeepfleetError) as info:
        asyncio.run(effective_head_files(Host(name="gpu1", address="gpu1"), options))
    [problem] = info.value.problems
    assert problem.where == "host gpu1" and problem.what.startswith("ssh -G cannot read the ssh config for it: ")
