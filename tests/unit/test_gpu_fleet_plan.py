"""`deepfleet plan` and `deepfleet train --dry-run` on recorded facts of GPU fleets, from this GPU-less
head: what a login node would print for 2 x 8 H100, 1 x 4 A100, and the fleets it must refuse."""

import json

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from typer.testing import CliRunner

from deepfleet.cli.app import app
from deepfleet.errors import DeepfleetError
from gpu_fleet_facts import A100, A100_40, H100, V100, host_record, write_fleet
from plan_model_configs import llama3_8b


@pytest.fixture(scope="module")
def llama_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-plan")
    llama3_8b().save_pretrained(root / "llama3-8b")
    (root / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "hello"}]}\n')
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {root / 'llama3-8b'}\ndeepspeed: auto\nmethod: full\n"
                      f"data: {{train: {root / 'train.jsonl'}, max_length: 4096}}\n"
                      f"train: {{global_batch: 256, micro_batch: 4, gradient_checkpointing: true}}\n"
                      f"output_dir: {root / 'runs'}\n")
    return recipe


def invoke(*args):
    """Exit code and output as the `deepfleet` command gives them (a DeepfleetError: its lines, exit 2)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, DeepfleetError):
        return result.exception.exit_code, result.output + result.exception.render() + "\n"
    return result.exit_code, result.output


def two_h100_hosts(tmp_path, **changes):
    records = [host_record("h100-a", "10.1.0.11", **changes), host_record("h100-b", "10.1.0.12", **changes)]
    return write_fleet(tmp_path, records)


@pytest.mark.parametrize("command", [["plan"], ["train", "--dry-run"]])
def test_two_hosts_of_eight_h100(llama_recipe, tmp_path, command):
    fleet, facts = two_h100_hosts(tmp_path)
    code, out = invoke(*command, llama_recipe, "--fleet", fleet, "--facts", facts)
    assert code == 0, out
    assert f"hosts: 2 host(s): 8 rank(s) on 8 x NVIDIA H100 80GB HBM3 (80 GiB, bf16) per host, from {facts}" in out
    assert "ranks: 16 ranks (8 per host) on cuda, NCCL, precision bf16" in out
    assert "attention flash_attention_2 (rows flattened)" in out
    assert "optimizer: torch AdamW" in out
    assert '"bf16": {\n    "enabled": true' in out or '"enabled": true' in out
    assert "--nproc=8" in out and "--nnodes=2" in out and "--first-rank=8 --world-size=16" in out
    # The interface every host shares with the addresses ssh uses; the rendezvous on h100-a's address there.
    assert "env NCCL_SOCKET_IFNAME=eth0" in out and "env GLOO_SOCKET_IFNAME=eth0" in out
    assert "--master-addr=10.1.0.11" in out
    assert "network: 10.1.0.0/24 via eth0; InfiniBand on every host: NCCL_IB_HCA=mlx5_0" in out
    assert out.count("env NCCL_IB_HCA=mlx5_0") == 2
    assert "memory per rank (GPU)" in out


def test_infiniband_on_some_hosts_only_disables_it_on_every_host(llama_recipe, tmp_path):
    fleet, facts = write_fleet(tmp_path, [host_record("g1", "10.1.0.11"), host_record("g2", "10.1.0.12"),
                                          host_record("g3", "10.1.0.13", infiniband=False)])
    code, out = invoke("train", "--dry-run", llama_recipe, "train.global_batch=192", "--fleet", fleet,
                       "--facts", facts)
    assert code == 0, out
    assert "InfiniBand active on g1, g2 but not on g3: NCCL_IB_DISABLE=1 on every host" in out
    assert out.count("env NCCL_IB_DISABLE=1") == 3 and "NCCL_IB_HCA" not in out


def test_infiniband_off_in_the_fleet_file_and_the_users_own_variables_win(llama_recipe, tmp_path, monkeypatch):
    fleet, facts = two_h100_hosts(tmp_path)
    fleet.write_text("infiniband: off\n" + fleet.read_text())
    code, out = invoke("train", "--dry-run", llama_recipe, "--fleet", fleet, "--facts", facts)
    assert code == 0 and "NCCL_IB" not in out
    fleet, facts = two_h100_hosts(tmp_path)
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_4")
    code, out = invoke("train", "--dry-run", llama_recipe, "--fleet", fleet, "--facts", facts)
    assert code == 0 and out.count("env NCCL_IB_HCA=mlx5_4") == 2 and "env NCCL_IB_HCA=mlx5_0" not in out


def test_plan_json_memory_matches_deepspeeds_estimator(llama_recipe, tmp_path):
    fleet, facts = two_h100_hosts(tmp_path)
    code, out = invoke("plan", llama_recipe, "--fleet", fleet, "--facts", facts, "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert plan["fleet"] == {"nodes": 2, "ranks_per_node": 8, "accelerator": "cuda",
                             "device_memory_bytes": 81559 * 2**20}
    assert plan["deepspeed_config"]["bf16"]["enabled"] is True
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(plan["total_params"], num_gpus_per_node=8, num_nodes=2,
                                                         cpu_offload=False)
    zero2 = next(r for r in plan["rows"] if (r["stage"], r["offload"]) == (2, "none"))
    assert abs(zero2["model_states_bytes"] - gpu_bytes) <= 0.01 * gpu_bytes


def test_one_host_of_four_a100_without_flash_attn(llama_recipe, tmp_path):
    fleet, facts = write_fleet(tmp_path, [host_record("a100", "10.1.0.21", gpu=A100, gpus=4, flash_attn=False,
                                                      infiniband=False)])
    code, out = invoke("train", "--dry-run", llama_recipe, "--fleet", fleet, "--facts", facts)
    assert code == 0, out
    assert "ranks: 4 ranks (4 per host) on cuda, NCCL, precision bf16" in out
    assert "attention sdpa" in out and "flash_attention_2" not in out
    assert "--nproc=4" in out and "NCCL_SOCKET_IFNAME" not in out   # one host: no inter-host traffic


def test_v100_plans_fp16_and_refuses_bf16(llama_recipe, tmp_path):
    fleet, facts = write_fleet(tmp_path, [host_record("v100", "10.1.0.31", gpu=V100, gpus=8)])
    code, out = invoke("plan", llama_recipe, "--fleet", fleet, "--facts", facts, "--json")
    assert code == 0, out
    assert json.loads(out)["deepspeed_config"]["fp16"]["enabled"] is True
    code, out = invoke("plan", llama_recipe, "precision=bf16", "--fleet", fleet, "--facts", facts)
    assert code == 2
    assert out.strip().splitlines()[-1] == ("error: precision: precision bf16, but host v100's Tesla V100-SXM2-32GB "
                                            "has no bf16 (fix: use precision: fp16 (or auto) on these GPUs)")


@pytest.mark.parametrize("records,expected", [
    ([host_record("g1", "10.1.0.11"), host_record("c1", "10.1.0.12", gpus=0)],
     "host(s) c1 have no GPU, while g1 do"),
    ([host_record("g1", "10.1.0.11"), host_record("g2", "10.1.0.12", gpu=A100)],
     "host g2 has NVIDIA A100-SXM4-80GB, the others NVIDIA H100 80GB HBM3"),
    ([host_record("g1", "10.1.0.11", gpus=4, slots=8)],
     "slots=8 on host g1, which has 4 GPU(s)"),
])
def test_unfit_fleets_are_refused_in_one_line_naming_the_host(llama_recipe, tmp_path, records, expected):
    fleet, facts = write_fleet(tmp_path, records)
    for command in (["plan"], ["train", "--dry-run"]):
        code, out = invoke(*command, llama_recipe, "--fleet", fleet, "--facts", facts)
        assert code == 2, out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0] and "fix:" in errors[0], out
        assert "Traceback" not in out


def test_a_host_missing_from_the_record_is_named(llama_recipe, tmp_path):
    fleet, _ = write_fleet(tmp_path, [host_record("g1", "10.1.0.11"), host_record("g2", "10.1.0.12")])
    _, facts = write_fleet(tmp_path, [host_record("g1", "10.1.0.11")], name="old")
    code, out = invoke("plan", llama_recipe, "--fleet", fleet, "--facts", facts)
    assert code == 2 and f"no facts for host(s) g2 of {fleet}" in out and "doctor --record" in out


def test_smallest_gpu_memory_and_slowest_measured_link_plan_the_fleet(llama_recipe, tmp_path):
    records = [host_record("g1", "10.1.0.11", gpu=A100, bandwidth_gbps=90.0),
               host_record("g2", "10.1.0.12", gpu=A100, bandwidth_gbps=8.0)]
    fleet, facts = write_fleet(tmp_path, records)
    code, out = invoke("plan", llama_recipe, "--fleet", fleet, "--facts", facts, "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert plan["fleet"]["device_memory_bytes"] == A100[1] * 2**20
    assert any("Gbit/s" in line or "link" in line for line in [plan["choice"]["reason"], *plan["choice"]["warnings"]])
    # 40 GB A100s beside 80 GB ones are a different model name: refused (see above); memory comes from the record.
    assert A100_40[1] < A100[1]


@pytest.mark.parametrize("command", [["plan"], ["train", "--dry-run"]])
def test_eight_plus_four_h100(llama_recipe, tmp_path, command):
    """Seed 001's fleet: one host with 4 GPUs beside one with 8; each host's torchrun gets its own count."""
    fleet, facts = write_fleet(tmp_path, [host_record("h100-a", "10.1.0.11"),
                                          host_record("h100-b", "10.1.0.12", gpus=4)])
    code, out = invoke(*command, llama_recipe, "train.global_batch=192", "--fleet", fleet, "--facts", facts)
    assert code == 0, out
    assert "ranks: 12 ranks (8+4 per host) on cuda, NCCL, precision bf16" in out
    assert "--nproc=8" in out and "--nproc=4" in out
    code, out = invoke(*command, llama_recipe, "--fleet", fleet, "--facts", facts)   # 256 rows over 12 ranks
    assert code == 2 and "cannot be split evenly over 12 ranks" in out


def test_fused_adam_only_when_prebuilt_on_every_host(llama_recipe, tmp_path):
    def optimizer(*prebuilt_per_host):
        records = [host_record(f"g{i}", f"10.1.0.{11 + i}", prebuilt_ops=ops) for i, ops in enumerate(prebuilt_per_host)]
        fleet, facts = write_fleet(tmp_path, records)
        code, out = invoke("plan", llama_recipe, "--fleet", fleet, "--facts", facts, "--json")
        assert code == 0, out
        plan = json.loads(out)
        return plan["deepspeed_config"]["optimizer"]["params"], plan["summary"][-1]
    params, line = optimizer(("fused_adam",), ())
    assert params["torch_adam"] is True and line.startswith("optimizer: torch AdamW")
    params, line = optimizer(("fused_adam", "cpu_adam"), ("fused_adam",))
    assert "torch_adam" not in params and line.startswith("optimizer: DeepSpeed FusedAdam")


def test_doctors_measured_bandwidth_reaches_the_planner(llama_recipe, tmp_path, monkeypatch):
    """doctor keeps its facts per fleet; a later plan that asks the hosts (no bandwidth test) uses its link."""
    import importlib

    from deepfleet.fleet.doctor_store import load_doctor_facts, save_doctor_facts
    from deepfleet.fleet.facts import HostFacts
    from deepfleet.fleet.fleet_yaml import load_fleet_yaml

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    measured = [host_record("g1", "10.1.0.11", bandwidth_gbps=3.0), host_record("g2", "10.1.0.12", bandwidth_gbps=2.5)]
    fleet_file, _ = write_fleet(tmp_path, measured)
    fleet = load_fleet_yaml(fleet_file)
    assert load_doctor_facts(fleet) is None
    save_doctor_facts(fleet, measured)
    assert oct((tmp_path / "cache" / "deepfleet" / "doctor").stat().st_mode & 0o777) == "0o700"
    probed = [HostFacts.from_record(host_record(n, a)) for n, a in (("g1", "10.1.0.11"), ("g2", "10.1.0.12"))]
    hardware_module = importlib.import_module("deepfleet.fleet_hardware")
    monkeypatch.setattr(hardware_module, "probe_fleet", lambda fleet, options, **asked: probed)
    code, out = invoke("plan", llama_recipe, "--fleet", fleet_file, "--json")
    assert code == 0, out
    summary = json.loads(out)["summary"]
    assert any(line.startswith("link: 2.5 Gbit/s between hosts, from deepfleet doctor, ") for line in summary)
    code, out = invoke("plan", llama_recipe, "--fleet", fleet_file, "--link-gbps", "100", "--json")
    assert "link: 100 Gbit/s between hosts, from --link-gbps" in json.loads(out)["summary"]


def test_qlora_needs_bitsandbytes_on_every_host(llama_recipe, tmp_path):
    with_bnb = host_record("g1", "10.1.0.11")
    without = host_record("g2", "10.1.0.12")
    without["data"]["packages"]["bitsandbytes"]["version"] = None
    fleet, facts = write_fleet(tmp_path, [with_bnb, without])
    code, out = invoke("plan", llama_recipe, "method=qlora", "deepspeed.zero=2", "--fleet", fleet, "--facts", facts)
    assert code == 2 and "method qlora needs bitsandbytes, not installed on host(s) g2" in out
    fleet, facts = write_fleet(tmp_path, [with_bnb, host_record("g2", "10.1.0.12")])
    code, out = invoke("train", "--dry-run", llama_recipe, "method=qlora", "deepspeed.zero=2", "--fleet", fleet,
                       "--facts", facts)
    assert code == 0, out


def test_include_pins_gpus_and_exclude_drops_a_host(llama_recipe, tmp_path):
    fleet, facts = write_fleet(tmp_path, [host_record("h100-a", "10.1.0.11"), host_record("h100-b", "10.1.0.12"),
                                          host_record("h100-c", "10.1.0.13")])
    code, out = invoke("train", "--dry-run", llama_recipe, "train.global_batch=192", "--fleet", fleet,
                       "--facts", facts, "--include", "h100-a:0,1,2,3@h100-b")
    assert code == 0, out
    assert "ranks: 12 ranks (8+4 per host)" in out and "h100-c" not in out
    assert "[h100-a]   env CUDA_VISIBLE_DEVICES=0,1,2,3" in out and "[h100-b]   env CUDA_VISIBLE_DEVICES" not in out
    code, out = invoke("plan", llama_recipe, "train.global_batch=192", "--fleet", fleet, "--facts", facts, "--json")
    assert json.loads(out)["fleet"]["nodes"] == 3
    code, out = invoke("train", "--dry-run", llama_recipe, "--fleet", fleet, "--facts", facts, "--exclude", "h100-c")
    assert code == 0 and "ranks: 16 ranks (8 per host)" in out and "[h100-c]" not in out
