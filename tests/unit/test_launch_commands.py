import shlex

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.network import InterfaceChoice
from deepfleet.fleet.ssh import SshOptions
from deepfleet.launch.environment import job_environment
from deepfleet.env_vars import masked
from deepfleet.launch.job import LaunchSettings, plan_launch

TWO_HOSTS = Fleet(hosts=(Host(name="gpu1", address="10.0.0.1", slots=2), Host(name="gpu2", address="10.0.0.2", slots=2)),
                  source="fleet.yaml", python="/opt/venv/bin/python", master_port=29500)
CHOICE = InterfaceChoice(network="192.168.7.0/24", per_host={"gpu1": "ib0", "gpu2": "ib0"},
                         addresses={"gpu1": "192.168.7.1", "gpu2": "192.168.7.2"})


def plan(settings=None, parent_env=None, **kwargs):
    return plan_launch(TWO_HOSTS, settings or LaunchSettings(command=["python", "train.py", "--deepspeed", "ds.json"]),
                       job_id="df-test", cwd="/work/proj", parent_env=parent_env or {}, extra_env=kwargs.get("extra", {}),
                       interface=kwargs.get("interface", CHOICE), ssh_options=SshOptions(known_hosts_file="/k"))


def test_each_host_gets_ssh_and_an_agent_with_its_node_rank_and_ranks():
    launch = plan()
    for node_rank, host in enumerate(launch.hosts):
        argv = host.argv
        assert argv[0] == "ssh" and "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
        remote = shlex.split(argv[-1])
        assert remote[:3] == ["/opt/venv/bin/python", "-m", "deepfleet.launch.host_agent"]
        agent = remote[:remote.index("--")]
        assert f"--job-id=df-test.{node_rank}" in agent and "--cwd=/work/proj" in agent
        assert f"--node-rank={node_rank}" in agent and "--nnodes=2" in agent and "--nproc=2" in agent
        assert f"--first-rank={2 * node_rank}" in agent and "--world-size=4" in agent
        assert "--master-addr=192.168.7.1" in agent, "rendezvous must use the chosen private interface"
        assert remote[remote.index("--") + 1:] == ["/opt/venv/bin/python", "train.py", "--deepspeed", "ds.json"]


def test_interface_variables_and_allow_list_but_no_unlisted_variables():
    env = plan(parent_env={"NCCL_DEBUG": "INFO", "HF_HOME": "/cache", "HOME": "/root", "LD_PRELOAD": "x.so"}).hosts[0].env
    assert env["GLOO_SOCKET_IFNAME"] == "ib0" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["NCCL_DEBUG"] == "INFO" and env["HF_HOME"] == "/cache"
    assert "HOME" not in env and "LD_PRELOAD" not in env


def test_secrets_never_on_a_command_line_and_masked_in_dry_run():
    launch = plan(parent_env={"HF_TOKEN": "hf_secret_value"}, extra={"WANDB_API_KEY": "wandb_secret_value"})
    for host in launch.hosts:
        assert host.env["HF_TOKEN"] == "hf_secret_value"   # travels on stdin
        assert "secret_value" not in " ".join(host.argv)
    shown = launch.render()
    assert "secret_value" not in shown and "HF_TOKEN=****" in shown and "WANDB_API_KEY=****" in shown


def test_tracker_credentials_reach_the_ranks_and_are_masked_in_dry_run():
    launch = plan(parent_env={"WANDB_API_KEY": "wandb_secret_value", "MLFLOW_TRACKING_TOKEN": "mlflow_secret_value",
                              "MLFLOW_TRACKING_URI": "https://bob:url_secret_value@mlflow.example:5000"})
    env = launch.hosts[0].env
    assert env["WANDB_API_KEY"] == "wandb_secret_value" and env["MLFLOW_TRACKING_TOKEN"] == "mlflow_secret_value"
    assert env["MLFLOW_TRACKING_URI"] == "https://bob:url_secret_value@mlflow.example:5000"
    assert "secret_value" not in " ".join(launch.hosts[0].argv)
    shown = launch.render()
    assert "secret_value" not in shown and "MLFLOW_TRACKING_TOKEN=****" in shown
    assert "https://bob:****@mlflow.example:5000" in shown


def test_recipe_env_wins_over_shell_and_interface():
    env = job_environment({"OMP_NUM_THREADS": "8"}, interface="eth0", extra={"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "eth1"})
    assert env["OMP_NUM_THREADS"] == "2" and env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert masked({"MY_PASSWORD": "p", "A": "b"}) == {"MY_PASSWORD": "****", "A": "b"}


def test_hostile_values_are_quoted_for_the_remote_shell():
    launch = plan(LaunchSettings(command=["python", "train.py", "--name", "x; rm -rf /"]))
    remote = launch.hosts[0].argv[-1]
    assert "'x; rm -rf /'" in remote and shlex.split(remote)[-1] == "x; rm -rf /"


def test_bad_launch_requests_are_one_line_errors():
    with pytest.raises(DeepfleetError, match="no command"):
        plan(LaunchSettings(command=[]))
    unknown = Fleet(hosts=(Host(name="a", address="10.0.0.1", slots=2), Host(name="b", address="10.0.0.2")),
                    source="fleet.yaml")
    with pytest.raises(DeepfleetError, match="slots of host.s. b unknown"):
        plan_launch(unknown, LaunchSettings(command=["x"]), job_id="j", cwd="/", parent_env={}, extra_env={},
                    interface=None, ssh_options=SshOptions())
    split = InterfaceChoice(network="10.0.0.0/24", per_host={"gpu1": "eth0"}, addresses={"gpu1": "10.0.0.1"}, outside=["gpu2"])
    with pytest.raises(DeepfleetError, match="share no subnet"):
        plan(interface=split)


def test_local_single_host_runs_without_ssh_on_loopback():
    local = Fleet(hosts=(Host(name="me", address="localhost", slots=2, local=True),), source="local machine", python="/py")
    launch = plan_launch(local, LaunchSettings(command=["python", "t.py"]), job_id="j", cwd="/w", parent_env={},
                         extra_env={}, interface=None, ssh_options=SshOptions())
    assert launch.hosts[0].argv[0] == "/py" and "--master-addr=127.0.0.1" in launch.hosts[0].argv


def test_deepspeed_backend_exports_interface_withholds_secrets_and_checks_ssh_itself():
    from deepfleet.launch.backends import deepspeed_runner_command, render_deepspeed

    launch_plan = plan(parent_env={"HF_TOKEN": "hf_secret_value", "HF_HOME": "/my cache"})
    ds = deepspeed_runner_command(TWO_HOSTS, launch_plan, state_dir="/run/x", ssh_args=["-F", "/cfg"], cwd="/w")
    env_file = ds.files["/run/x/deepspeed_env"]
    assert "GLOO_SOCKET_IFNAME=ib0" in env_file and "HF_HOME=/my cache\n" in env_file   # DeepSpeed quotes it
    assert "secret_value" not in env_file and ds.withheld_secrets == ["HF_TOKEN"]
    assert ds.files["/run/x/hostfile"] == "10.0.0.1 slots=2\n10.0.0.2 slots=2\n"
    assert ds.env["DS_ENV_FILE"] == "/run/x/deepspeed_env" and ds.env["PDSH_SSH_ARGS_APPEND"] == "-F /cfg"
    assert ds.argv[-3:] == ["train.py", "--deepspeed", "ds.json"] and "--master_addr" in ds.argv
    assert "secret_value" not in render_deepspeed(ds)


@pytest.mark.parametrize("parent_env,command,cwd,where", [
    ({"NCCL_DEBUG_SUBSYS": 'a"; touch /tmp/x; "'}, ["python", "train.py"], "/w", "env NCCL_DEBUG_SUBSYS"),
    ({"NCCL_DEBUG": "$(id)"}, ["python", "train.py"], "/w", "env NCCL_DEBUG"),
    ({}, ["python", "train.py", "--tag=x;id"], "/w", "command"),
    ({}, ["python", "train.py"], "/home/me/my runs", "working dir"),
])
def test_deepspeed_backend_refuses_what_its_launcher_would_let_the_shell_reinterpret(parent_env, command, cwd, where):
    from deepfleet.launch.backends import deepspeed_runner_command

    launch_plan = plan(LaunchSettings(command=command), parent_env=parent_env)
    with pytest.raises(DeepfleetError) as error:
        deepspeed_runner_command(TWO_HOSTS, launch_plan, state_dir="/run/x", ssh_args=[], cwd=cwd)
    assert len(error.value.problems) == 1 and f"--backend deepspeed: {where}" in str(error.value)


def test_deepspeed_runner_environment_drops_the_heads_secrets():
    from deepfleet.launch.backends import deepspeed_runner_environment

    env = deepspeed_runner_environment({"MLFLOW_TRACKING_PASSWORD": "pw", "PYTHONPATH": "/p", "HF_TOKEN": "t"},
                                       {"DS_ENV_FILE": "/run/x/env"})
    assert env == {"PYTHONPATH": "/p", "DS_ENV_FILE": "/run/x/env"}


def test_slurm_script_takes_master_and_node_rank_from_the_allocation():
    from deepfleet.launch.backends import slurm_script

    script = slurm_script(plan(parent_env={"HF_TOKEN": "hf_secret_value"}))
    assert "#SBATCH --nodes=2" in script and 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    assert '--node-rank="$SLURM_NODEID"' in script and "secret_value" not in script
    assert "srun --kill-on-bad-exit=1" in script


def test_manual_mode_prints_one_line_per_host_with_secret_references():
    from deepfleet.launch.backends import manual_commands

    lines = manual_commands(plan(parent_env={"HF_TOKEN": "hf_secret_value"}))
    assert len(lines) == 2 and "--node-rank=1" in lines[1] and lines[1].startswith("# on gpu2")
    assert 'HF_TOKEN="$HF_TOKEN"' in lines[0] and "secret_value" not in "".join(lines)


def test_hosts_with_different_gpu_counts_get_their_own_nproc():
    """Seed 001's hostfile: node2 slots=4 beside 8-slot nodes. Ranks are numbered host after host."""
    from deepfleet.launch.backends import deepspeed_runner_command, slurm_script

    uneven = Fleet(hosts=(Host(name="a", address="10.0.0.1", slots=8), Host(name="b", address="10.0.0.2", slots=4)),
                   source="hostfile", python="/py")
    launch = plan_launch(uneven, LaunchSettings(command=["python", "t.py"]), job_id="j", cwd="/w", parent_env={},
                         extra_env={}, interface=None, ssh_options=SshOptions())
    assert launch.ranks_per_host == (8, 4) and launch.world_size == 12
    assert ["--nproc=8" in h.argv[-1] for h in launch.hosts] == [True, False]
    second = launch.hosts[1].argv[-1]
    assert "--nproc=4" in second and "--node-rank=1" in second and "--first-rank=8" in second
    assert all("--world-size=12" in h.argv[-1] for h in launch.hosts)
    assert "12 rank(s)" in launch.render().splitlines()[0]
    ds = deepspeed_runner_command(uneven, launch, state_dir="/s", ssh_args=[], cwd="/w")
    assert ds.files["/s/hostfile"] == "10.0.0.1 slots=8\n10.0.0.2 slots=4\n"
    with pytest.raises(DeepfleetError, match="different rank counts"):
        slurm_script(launch)


def test_ranks_find_the_environments_own_tools_first():
    from deepfleet.launch.host_agent import with_environment_bin

    assert with_environment_bin("/usr/bin:/bin", "/opt/venv/bin/python") == "/opt/venv/bin:/usr/bin:/bin"
    assert with_environment_bin("/opt/venv/bin:/usr/bin", "/opt/venv/bin/python") == "/opt/venv/bin:/usr/bin"
    assert with_environment_bin("", "/opt/venv/bin/python") == "/opt/venv/bin"


def test_each_rank_gets_torchruns_environment_with_its_global_rank():
    from deepfleet.launch.host_ranks import RankLayout, listen_address, rank_env

    second_host = RankLayout(node_rank=1, nnodes=2, nproc=4, first_rank=8, world_size=12, master_addr="10.0.0.1",
                             master_port=29500)
    env = rank_env(second_host, 3, base={"HF_HOME": "/c"}, master_port=29500)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("11", "3", "12", "4")
    assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "10.0.0.1")
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True" and env["HF_HOME"] == "/c"
    assert env["OMP_NUM_THREADS"] == "1"                       # torchrun's default beside other ranks
    assert rank_env(second_host, 0, base={"OMP_NUM_THREADS": "8"}, master_port=1)["OMP_NUM_THREADS"] == "8"
    # The store binds the master's address; a host name is bound everywhere, as torchrun does.
    assert listen_address("10.0.0.1") == "10.0.0.1" and listen_address("fd00::1") == "fd00::1"
    assert listen_address("node1") == ""
