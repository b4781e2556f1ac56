"""Fuzz the fleet's parsers (hostfile, fleet.yaml, SLURM node lists, PBS nodefiles): any mutation of a valid
input ends in a fleet or a DeepfleetError, never another exception."""

from hypothesis import example, given, strategies as st

from deepfleet.fleet.fleet_yaml import parse_fleet_yaml
from deepfleet.fleet.sources import expand_nodelist, parse_hostfile, parse_pbs_nodefile
from fuzz_inputs import WEIRD_STRINGS, damaged, outcome, yaml_text

VALID_FLEET = {
    "defaults": {"user": "ubuntu", "slots": 8, "env": {"NCCL_DEBUG": "INFO"}},
    "python": "/opt/venv/bin/python", "master_port": 29500, "infiniband": "auto",
    "ssh": {"identity_file": "~/.ssh/id_ed25519", "connect_timeout": 5},
    "hosts": ["gpu1", {"address": "10.0.0.12", "name": "gpu2", "slots": 4, "port": 22, "interface": "ens5"}],
}
HOSTFILE = "gpu1 slots=8\n# comment\n10.0.0.2 slots=4 ens5\n\ngpu3 slots=1\n"
NODELISTS = ["gpu[01-04,07],cpu5", "a", "n[1-3]x[5-6]", "node-[001-002]"]
PBS_NODEFILE = "gpu1\ngpu1\ngpu2\n# c\n\n"
fragment = st.one_of(st.sampled_from(WEIRD_STRINGS + ["[", "]", ",", "-", "01", "99999999999", "[1-", "a[1-2]"]),
                     st.text(alphabet="ab01-[],. \x00é", max_size=10))


@st.composite
def hostfile_text(draw):
    return damaged(draw, draw(st.sampled_from([HOSTFILE, HOSTFILE.replace("8", draw(fragment))])))


@given(yaml_text(VALID_FLEET))
@example("hosts: [a]\nmaster_port: 1e999\n")
@example("\x00hosts: [a]\n")   # a character YAML forbids: was a two-line message without the line
@example("hosts: [a]\n? '\n\n  '\n: null\n")   # a key with a line break: was echoed, splitting the error line
def test_fuzz_fleet_yaml(text):
    outcome(lambda: parse_fleet_yaml(text, "fleet.yaml"))


@given(hostfile_text())
@example("gpu1 slots=99999999999999999999999\n")
def test_fuzz_hostfile(text):
    outcome(lambda: parse_hostfile(text, "hostfile"))


@given(st.sampled_from(NODELISTS), st.lists(st.tuples(st.integers(0, 30), fragment), max_size=3))
def test_fuzz_slurm_nodelist(nodelist, insertions):
    for index, text in insertions:
        nodelist = nodelist[:index] + text + nodelist[index:]
    outcome(lambda: expand_nodelist(nodelist))


@given(st.builds(lambda text, extra: text + extra, st.just(PBS_NODEFILE), st.text(max_size=20)))
def test_fuzz_pbs_nodefile(text):
    outcome(lambda: parse_pbs_nodefile(text, "nodefile"))
