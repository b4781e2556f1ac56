import pytest

from deepfleet.launch.bound_torchrun import hosts_rendezvous, with_master_port

COMMAND = ["--no-python", "python", "train.py", "--master-port=7"]


@pytest.mark.parametrize("argv,expected", [
    (["--nnodes=2", "--node-rank=0", "--master-addr=10.1.2.3", "--master-port=29500", *COMMAND],
     ("10.1.2.3", 29500)),
    (["--nnodes=2", "--node-rank=0", "--master-addr", "fd00::1", "--master-port", "0", *COMMAND], ("fd00::1", 0)),
    (["--nnodes=2", "--node-rank=1", "--master-addr=10.1.2.3", "--master-port=29500", *COMMAND], None),
    (["--nnodes=2", "--node-rank=0", "--master-addr=gpu01", "--master-port=29500", *COMMAND], None),
    (["--standalone", "--nproc-per-node=2", *COMMAND], None),
])
def test_only_node_0_of_a_static_rendezvous_at_an_ip_hosts_the_bound_store(argv, expected):
    assert hosts_rendezvous(argv) == expected


def test_master_port_is_replaced_in_torchruns_options_only():
    argv = ["--nnodes=1", "--master-port", "0", "--master_port=0", "--master-addr=127.0.0.1", *COMMAND]
    assert with_master_port(argv, 41234) == [
        "--nnodes=1", "--master-addr=127.0.0.1", "--no-python", "--master-port=41234", *COMMAND[1:]]
