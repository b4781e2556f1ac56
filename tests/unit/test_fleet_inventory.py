import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.fleet_yaml import parse_fleet_yaml, render_fleet_yaml
from deepfleet.fleet.inventory import hosts_from_names, render_hostfile
from deepfleet.fleet.sources import expand_nodelist, parse_hostfile, parse_pbs_nodefile, resolve_fleet


def problems(function, *args):
    with pytest.raises(DeepfleetError) as info:
        function(*args)
    return [p.render() for p in info.value.problems]


def test_hostfile_as_deepspeed_reads_it():
    text = "# cluster\n\ngpu1 slots=8\ngpu2 slots=4 ib0   # DeepSpeed ignores trailing words\n10.0.0.3 slots=1\n"
    hosts = parse_hostfile(text, "hf")
    assert [(h.name, h.slots) for h in hosts] == [("gpu1", 8), ("gpu2", 4), ("10.0.0.3", 1)]
    assert render_hostfile(hosts) == "gpu1 slots=8\ngpu2 slots=4\n10.0.0.3 slots=1\n"


@pytest.mark.parametrize("text, line, words", [
    ("gpu1 slots=8\ngpu2 8\n", 2, "not a hostfile line: 'gpu2 8'"),
    ("gpu1 slots=8\n\ngpu1 slots=2\n", 3, "listed twice (first at hf:1)"),
    ("gpu1 slots=0\n", 1, "slots=0"),
    ("gpu1;reboot slots=1\n", 1, "not allowed in a host name: ';'"),
    ("$(id) slots=1\n", 1, "not allowed in a host name"),
    ("-oProxyCommand=x slots=1\n", 1, "starts with '-'"),
])
def test_hostfile_errors_name_file_and_line(text, line, words):
    found = problems(parse_hostfile, text, "hf")
    assert len(found) == 1 and found[0].startswith(f"hf:{line}: ") and words in found[0], found


def test_hostfile_reports_every_bad_line_at_once():
    assert len(problems(parse_hostfile, "a slots=0\nb slots\nc;d slots=1\n", "hf")) == 3
    assert "no hosts" in problems(parse_hostfile, "# empty\n", "hf")[0]


def test_slurm_nodelist_expansion_keeps_padding():
    assert expand_nodelist("gpu[01-04,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]
    assert expand_nodelist("n[1-2]-ib[0-1]") == ["n1-ib0", "n1-ib1", "n2-ib0", "n2-ib1"]
    assert expand_nodelist("single") == ["single"]


@pytest.mark.parametrize("nodelist, words", [
    ("gpu[01-04", "'[' without ']'"), ("gpu]1", "']' without '['"), ("gpu[4-1]", "runs backwards"),
    ("gpu[a-b]", "is not a number or range"), ("gpu1,,gpu2", "empty entry"), ("g[[1]]", "nested"),
    ("gpu;ls", "not allowed in a host name"), ("gpu[1-2],gpu2", "host 'gpu2' listed twice"),
    ("gpu[]", "'' is not a number or range"), ("a[1-300]b[1-300]c[1-30]", "more than 100000 hosts"),
])
def test_bad_slurm_nodelist_is_one_error(nodelist, words):
    found = problems(expand_nodelist, nodelist)
    assert len(found) == 1 and found[0].startswith("SLURM_JOB_NODELIST: bad node list") and words in found[0]


def test_pbs_nodefile_counts_slots():
    hosts = parse_pbs_nodefile("n1\nn1\nn2\nn1\n", "nodefile")
    assert [(h.name, h.slots) for h in hosts] == [("n1", 3), ("n2", 1)]


FLEET = """\
defaults:
  user: ubuntu
  slots: 8
master_port: 29600
hosts:
  - gpu1
  - {address: 10.0.0.12, name: gpu2, slots: 4, interface: ens5, env: {NCCL_IB_DISABLE: "1"}}
"""


def test_fleet_yaml_defaults_and_overrides():
    fleet = parse_fleet_yaml(FLEET, "fleet.yaml")
    gpu1, gpu2 = fleet.hosts
    assert (gpu1.address, gpu1.user, gpu1.slots) == ("gpu1", "ubuntu", 8)
    assert (gpu2.name, gpu2.address, gpu2.slots, gpu2.interface) == ("gpu2", "10.0.0.12", 4, "ens5")
    assert dict(gpu2.env) == {"NCCL_IB_DISABLE": "1"} and fleet.master_port == 29600
    assert parse_fleet_yaml(render_fleet_yaml(fleet), "again").hosts == fleet.hosts


@pytest.mark.parametrize("text, expected", [
    ("hostz:\n  - a\n", 'fleet.yaml:1: unknown key hostz (did you mean "hosts"?)'),
    ("defaults:\n  slot: 2\nhosts: [a]\n", 'fleet.yaml:2: unknown key defaults.slot (did you mean "slots"?)'),
    ("hosts:\n  - a\n  - {adress: b}\n", 'fleet.yaml:3: unknown key hosts.1.adress (did you mean "address"?)'),
    ("ssh:\n  conect_timeout: 3\nhosts: [a]\n", 'fleet.yaml:2: unknown key ssh.conect_timeout (did you mean "connect_timeout"?)'),
    ("hosts:\n  - a\n  - b\n  - a\n", "fleet.yaml:4: host 'a' listed twice (first at fleet.yaml:2)"),
    ("hosts:\n  - {address: 'a b'}\n", "fleet.yaml:2: host 'a b' contains characters"),
    ("hosts:\n  - {address: a, user: 'root;id'}\n", "fleet.yaml:2: user 'root;id' is not a valid login name"),
    ("hosts:\n  - {address: a, slots: 0}\n", "fleet.yaml:2: slots=0"),
    ("hosts: [a\n", "fleet.yaml:2: not valid YAML"),
    ("hosts:\n  - {address: 10.0.0.1, name: a}\n  - {address: 10.0.0.2, name: a}\n",
     "fleet.yaml:3: host name 'a' used twice (first at fleet.yaml:2)"),
    ("master_port: 29500\nhosts: [a]\nmaster_port: 29600\n", "fleet.yaml:3: duplicate key master_port (first on line 1)"),
])
def test_fleet_yaml_errors_have_line_and_fix(text, expected):
    found = problems(parse_fleet_yaml, text, "fleet.yaml")
    assert any(p.startswith(expected) for p in found) and len(found) <= 2, found
    assert all("(fix: " in p for p in found)


def test_resolve_order(tmp_path):
    assert resolve_fleet(environ={}, cwd=tmp_path).hosts[0].local
    slurm = resolve_fleet(environ={"SLURM_JOB_NODELIST": "g[1-2]", "SLURM_GPUS_ON_NODE": "4"}, cwd=tmp_path)
    assert [(h.name, h.slots, h.via_srun) for h in slurm.hosts] == [("g1", 4, True), ("g2", 4, True)]
    assert slurm.master_port == 29500
    ports = {resolve_fleet(environ={"SLURM_JOB_NODELIST": "g1", "SLURM_JOB_ID": job}, cwd=tmp_path).master_port
             for job in ("4101", "4102", "24101")}   # two jobs sharing a node must not share a port
    assert ports == {14101, 14102} and all(1024 < p < 32768 for p in ports)
    (tmp_path / "nodes").write_text("a\na\n")
    assert resolve_fleet(environ={"PBS_NODEFILE": str(tmp_path / "nodes")}, cwd=tmp_path).hosts[0].slots == 2
    (tmp_path / "fleet.yaml").write_text("hosts: [x1]\n")
    assert resolve_fleet(environ={"SLURM_JOB_NODELIST": "g1"}, cwd=tmp_path).hosts[0].name == "x1"
    with pytest.raises(DeepfleetError, match="cannot read hostfile"):
        resolve_fleet(hostfile=str(tmp_path / "missing"), environ={}, cwd=tmp_path)


def test_hosts_option_parses_user_and_rejects_metacharacters():
    hosts = hosts_from_names("root@10.0.0.1, gpu2", user="ubuntu", port=2222)
    assert [(h.user, h.address, h.port) for h in hosts] == [("root", "10.0.0.1", 2222), ("ubuntu", "gpu2", 2222)]
    assert "not allowed" in problems(hosts_from_names, "gpu1,gpu2&&reboot")[0]
    assert "listed twice" in problems(hosts_from_names, "a,a")[0]


def test_non_utf8_hostfile_is_one_error(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"gpu1 slots=1\n\xff\xfe\n")
    with pytest.raises(DeepfleetError) as info:
        resolve_fleet(hostfile=str(hostfile))
    assert [p.render() for p in info.value.problems] == [f"{hostfile}:2: hostfile is not UTF-8 text (byte 0xff) (fix: save it as UTF-8 text)"]


@pytest.mark.parametrize("name, message", [
    ("", "empty host name"),
    ("a" * 300, "host name of 300 characters is longer than 253"),
    ("gpu1:22", "the port does not go in the host name"),
    ("gpü1", "characters not allowed in a host name: 'ü'"),
    ("::::", "is not a host name or IP address"),
])
def test_host_name_problems_say_what_is_wrong(name, message):
    from deepfleet.fleet.inventory import host_name_problem
    assert message in host_name_problem(name)


@pytest.mark.parametrize("name", ["gpu-1.example.com", "10.0.0.1", "::1", "fe80::1%eth0"])
def test_valid_host_names_pass(name):
    from deepfleet.fleet.inventory import host_name_problem
    assert host_name_problem(name) is None


def test_out_of_range_slots_and_port_are_named():
    assert problems(parse_hostfile, "gpu1 slots=99999999999999999999\n", "hf")[0].startswith("hf:1: slots=")
    with pytest.raises(DeepfleetError) as info:
        hosts_from_names("gpu1,gpu2", port=70000)
    assert info.value.render() == "error: --port: port 70000 out of range (fix: use 1-65535)"
