"""The table of bad fleets (hostfiles, fleet.yaml, SLURM node lists, PBS nodefiles): each through the real
CLI of every command that reads a fleet, exit 2, one `error: ` line starting as listed, nothing written."""

import pytest

from bad_input_harness import GOOD_RECIPE, Case, assert_refused

# (hostfile, start of the error line after `error: hosts`)
HOSTFILE_MISTAKES: list[tuple[str | bytes, str]] = [
    ("", ": hostfile lists no hosts"),
    ("gpu1 eight\n", ":1: not a hostfile line: 'gpu1 eight'"),
    ("gpu1 slots=8\ngpu1 slots=8\n", ":2: host 'gpu1' listed twice (first at hosts:1)"),
    ("gpu1 slots=0\n", ":1: slots=0 for host 'gpu1'"),
    ("gpu1`reboot` slots=1\n", ":1: host 'gpu1`reboot`' contains characters not allowed in a host name: '`'"),
    ("-oProxyCommand=x slots=1\n", ":1: host '-oProxyCommand=x' starts with '-'"),
    ("gpu1 slots=99999999999999999999\n", ":1: slots=99999999999999999999 for host 'gpu1'"),
    ("gpu1:22 slots=1\n", ":1: host 'gpu1:22': the port does not go in the host name"),
    (b"gpu1 slots=1\n\xff\n", ":2: hostfile is not UTF-8 text (byte 0xff)"),
    ("gpu1 slots=1\ngpu3\n", ":2: not a hostfile line: 'gpu3'"),
]
HOSTFILE_COMMANDS = [("hosts",), ("hostfile", "-o", "out"), ("doctor",), ("sync", "r.yaml"),
                     ("launch", "--dry-run", "--", "true"), ("env", "check"), ("bench", "comm"),
                     ("train", "r.yaml", "--dry-run")]
# (fleet.yaml, start of the error line after `error: f.yaml`)
FLEET_MISTAKES = [
    ("", ": a fleet file must be a mapping with a hosts: list"),
    ("hosts: []\n", ":1: hosts: List should have at least 1 item"),
    ("hosts: [a]\nmaster_prot: 1\n", ':2: unknown key master_prot (did you mean "master_port"?)'),
    ("hosts: [a]\nmaster_port: 70000\n", ":2: master_port: Input should be less than 65536"),
    ("hosts: [a, a]\n", ":1: host 'a' listed twice"),
    ("hosts:\n  - address: a\n    slots: x\n", ":3: hosts.0.slots: Input should be a valid integer"),
    ("hosts: [a]\ninfiniband: maybe\n", ":2: infiniband: Input should be 'auto' or 'off'"),
    ("hosts: [a]\nssh:\n  connect_timeout: 0\n", ":3: ssh.connect_timeout: Input should be greater than 0"),
    ("hosts: [a]\ndefaults:\n  usr: x\n", ':3: unknown key defaults.usr (did you mean "user"?)'),
    ("hosts:\n  - {address: a, user: 'r oot'}\n", ":2: user 'r oot' is not a valid login name"),
    ("hosts:\n  - {address: a, interface: 'eth 0'}\n", ":2: interface 'eth 0' is not an interface name"),
    ("hosts:\n  - {address: a, env: {1X: y}}\n", ":2: env name '1X' is not a valid variable name"),
    ("hosts: a\n", ":1: hosts: Input should be a valid list"),
    ("hosts: [a]\nhosts: [b]\n", ":2: duplicate key hosts (first on line 1)"),
    ("hosts: [\n", ":2: not valid YAML: expected the node content"),
    ("hosts: [a]\n\x07: 1\n", ":2: not valid YAML: character U+0007 is not allowed in YAML"),
]
FLEET_COMMANDS = [("hosts",), ("plan", "r.yaml")]
NODELIST_MISTAKES = [
    ("gpu[01-", "'[' without ']'"), ("gpu]1", "']' without '['"), ("a,,b", "empty entry"),
    ("gpu[3-1]", "range '3-1' runs backwards"), ("gpu[a-b]", "'a-b' is not a number or range"),
    ("gpu[1-999999]", "range '1-999999' is too large"), ("a,a", "host 'a' listed twice"),
    ("gpu[[1]]", "nested '['"), ("-x", "host '-x' starts with '-'"),
]
PBS_MISTAKES = [("", "error: {tmp}/nodes: nodefile lists no hosts"),
                ("gpu1\nbad host\n", "error: {tmp}/nodes:2: host 'bad host' contains characters"),
                ("-x\n", "error: {tmp}/nodes:1: host '-x' starts with '-'")]

FILES = {"r.yaml": GOOD_RECIPE}


def with_fleet(command: tuple[str, ...], *option: str) -> tuple[str, ...]:
    """The command with the fleet option before any `--` (after it, it would be the launched command's)."""
    end = command.index("--") if "--" in command else len(command)
    return (*command[:end], *option, *command[end:])


CASES = [Case(args=with_fleet(command, "--hostfile", "hosts"), expected=f"error: hosts{expected}", files={**FILES, "hosts": text})
         for text, expected in HOSTFILE_MISTAKES for command in HOSTFILE_COMMANDS]
CASES += [Case(args=with_fleet(command, "--fleet", "f.yaml"), expected=f"error: f.yaml{expected}", files={**FILES, "f.yaml": text})
          for text, expected in FLEET_MISTAKES for command in FLEET_COMMANDS]
CASES += [Case(args=("hosts",), expected=f"error: SLURM_JOB_NODELIST: bad node list {nodelist!r}: {expected}",
               env={"SLURM_JOB_NODELIST": nodelist}) for nodelist, expected in NODELIST_MISTAKES]
CASES += [Case(args=("hosts",), expected=expected, files={"nodes": text}, env={"PBS_NODEFILE": "{tmp}/nodes"})
          for text, expected in PBS_MISTAKES]
CASES += [
    Case(("hosts",), "error: {tmp}/missing: cannot read PBS nodefile: No such file", env={"PBS_NODEFILE": "{tmp}/missing"}),
    Case(("hosts",), "error: {tmp}/fleet.yaml:2: unknown key bogus", files={"fleet.yaml": "hosts: [a]\nbogus: 1\n"}),
    Case(("hosts", "--hostfile", "missing"), "error: missing: cannot read hostfile: No such file or directory"),
    Case(("hosts", "--fleet", "missing.yaml"), "error: missing.yaml: cannot read fleet file: No such file"),
    Case(("hosts", "--fleet", "f.yaml", "--hostfile", "hosts"), "error: command line: both --fleet and --hostfile given",
         files={"f.yaml": "hosts: [a]\n", "hosts": "a slots=1\n"}),
    Case(("ssh-setup", "--hosts", "a,a"), "error: --hosts: host 'a' listed twice"),
    Case(("ssh-setup", "--hosts", "a;b"), "error: --hosts: host 'a;b' contains characters not allowed"),
    Case(("ssh-setup", "--hosts", ","), "error: --hosts: no hosts given"),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_bad_fleet_input(case, tmp_path, monkeypatch, capsys):
    assert_refused(case, tmp_path, monkeypatch, capsys)
