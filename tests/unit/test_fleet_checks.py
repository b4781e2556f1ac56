"""Doctor checks on facts recorded from a 2-host namespace cluster (test_fleet_recorded_facts.json)."""

import copy
import json
from dataclasses import replace
from pathlib import Path


from deepfleet.fleet.checks import run_checks
from deepfleet.fleet.findings import Collected
from deepfleet.fleet.network import choose_fabric
from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.ssh import SshFailure

RECORDED = json.loads((Path(__file__).parent / "test_fleet_recorded_facts.json").read_text())


def collected(mutate=None, listener=None, **fields) -> Collected:
    records = copy.deepcopy(RECORDED["facts"])
    if mutate:
        mutate(records)
    facts = [HostFacts.from_record(r) for r in records]
    fleet = Fleet(hosts=tuple(f.host for f in facts), source="recorded")
    return Collected(fleet=fleet, facts=facts, listener=listener or RECORDED["listener"], **fields)


def failures(c: Collected, severity="fail"):
    return [f for f in run_checks(c) if f.severity == severity]


def test_recorded_healthy_cluster_has_no_fail_and_proposes_the_interface():
    findings = run_checks(collected(checksum_paths=("/work/main/pyproject.toml",)))
    assert not [f for f in findings if f.severity == "fail"]
    text = " | ".join(f.message for f in findings)
    assert "NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0" in text
    assert "/shared/runs is shared" in text and "identical on all hosts" in text
    assert "all 2 host->host ssh pairs work" in text and "every host reaches gpu1:29500" in text


def test_output_dir_not_shared_is_a_warning_with_checkpoint_advice():
    def unshared(records):
        for r in records:
            r["data"]["share_token_seen"] = False
    warned = [f for f in failures(collected(unshared), "warn") if f.check == "output-dir"]
    assert warned and "NOT shared" in warned[0].message and "resume" in warned[0].fix


def test_output_dir_shared_with_some_hosts_only_fails():
    def partly(records):
        records[1]["data"]["share_token_seen"] = False
    found = [f for f in failures(collected(partly)) if f.check == "output-dir"]
    assert found and "gpu1 only" in found[0].message


def test_deepspeed_version_mismatch_names_host_and_pip_line():
    def older(records):
        records[1]["data"]["packages"]["deepspeed"]["version"] = "0.14.0"
    found = [f for f in failures(collected(older)) if f.check == "versions"]
    assert len(found) == 1 and found[0].host == "gpu2" and "deepspeed 0.14.0 here" in found[0].message
    assert found[0].fix == "`deepfleet env sync` (or pip install deepspeed==0.19.8 on gpu2)"


def test_shadowed_package_is_a_warning():
    def shadow(records):
        records[0]["data"]["packages"]["torch"]["origin"] = "/home/me/torch/__init__.py"
    warned = [f for f in failures(collected(shadow), "warn") if f.check == "versions"]
    assert warned and warned[0].host == "gpu1" and "/home/me/torch" in warned[0].message


def test_missing_python_and_missing_workdir_fail():
    def broken(records):
        records[1]["data"]["python"]["wanted_found"] = False
        records[1]["data"]["workdir"]["exists"] = False
    found = {(f.check, f.host) for f in failures(collected(broken))}
    assert {("python", "gpu2"), ("workdir", "gpu2")} <= found


def test_gpu_count_versus_slots():
    def gpus(records):
        records[0]["data"]["accelerators"].update(count=4, models=["H100"] * 4)
        records[1]["data"]["accelerators"].update(count=8, models=["H100"] * 8)
        records[0]["host"]["slots"] = 8
        records[1]["host"]["slots"] = 4
    findings = run_checks(collected(gpus))
    assert any(f.host == "gpu1" and f.severity == "fail" and "slots=8 but only 4" in f.message for f in findings)
    assert any(f.host == "gpu2" and f.severity == "warn" and "slots=8" in f.fix for f in findings)


def test_cpu_and_gpu_hosts_mixed_fail():
    def mixed(records):
        records[0]["data"]["accelerators"].update(count=1, models=["A10"])
    assert any("some hosts have GPUs" in f.message for f in failures(collected(mixed)))


def test_host_in_another_subnet_fails_and_names_it():
    def moved(records):
        records[1]["data"]["interfaces"][1].update(address="10.99.0.2")
    found = [f for f in failures(collected(moved)) if f.check == "interface"]
    assert found and "no subnet is shared" in found[0].message


def test_interface_chosen_by_the_majority_names_the_odd_host():
    def three(records):
        third = copy.deepcopy(records[1])
        third["host"].update(name="gpu3", address="10.99.0.3")
        third["data"]["interfaces"][1].update(address="10.99.0.3")
        records.append(third)
    found = [f for f in failures(collected(three)) if f.check == "interface"]
    assert [f.host for f in found] == ["gpu3"]


def test_clock_skew_beyond_a_second_warns():
    def skewed(records):
        records[1]["data"]["time_start"] += 30
        records[1]["data"]["time_end"] += 30
    warned = [f for f in failures(collected(skewed), "warn") if f.check == "clock"]
    assert [f.host for f in warned] == ["gpu2"] and "+30" in warned[0].message


def test_master_port_blocked_and_busy():
    def blocked(records):
        records[1]["data"]["network"]["master"] = {"ok": False, "error": "timed out (packets dropped: firewall?)"}
    found = [f for f in failures(collected(blocked)) if f.check == "master-port"]
    assert [f.host for f in found] == ["gpu2"] and "29500" in found[0].fix
    busy = collected(listener={"ready": False, "error": "Address already in use"})
    assert any("Address already in use" in f.message for f in failures(busy))


def test_matrix_failures_grouped_by_target_and_not_repeated_for_unreachable_hosts():
    def cut(records):
        third = copy.deepcopy(records[1])
        third["host"].update(name="gpu3", address="10.213.242.4")
        records.append(third)
        ok = {"returncode": 0, "stderr": "", "seconds": 0.1}
        for record in records:
            record["data"]["network"]["hops"] = {n: ok for n in ("gpu1", "gpu2", "gpu3")
                                                 if n != record["host"]["name"]}
        denied = {"returncode": 255, "stderr": "root@10.213.242.3: Permission denied (publickey).", "seconds": 0.1}
        records[0]["data"]["network"]["hops"]["gpu2"] = denied
        records[2]["data"]["network"]["hops"]["gpu2"] = denied
    found = [f for f in failures(collected(cut)) if f.check == "ssh-matrix"]
    assert [f.message for f in found] == ["gpu1, gpu3 -> gpu2: key not accepted for user 'root'"]
    assert "ssh-setup" in found[0].fix

    def unreachable(records):
        records[0]["data"]["network"]["hops"]["gpu2"] = {"returncode": 255, "seconds": 3.0,
                                                         "stderr": "connect to host port 22: Connection refused"}
        records[1]["data"] = None
        records[1]["failure"] = {"kind": "unreachable", "what": "connection refused (no sshd listening)",
                                 "fix": "start sshd"}
    found = {(f.check, f.host): f for f in failures(collected(unreachable))}
    assert found[("ssh", "gpu2")].message.startswith("head -> root@") and ("ssh-matrix", "gpu1") not in found


def test_missing_matrix_answers_are_failures_not_silence():
    def silent(records):
        records[0]["data"]["network"]["hops"] = {}
    found = [f for f in failures(collected(silent)) if f.check == "ssh-matrix"]
    assert [f.message for f in found] == ["gpu1 -> gpu2: timed out"]


def test_checksums_that_differ_fail():
    def changed(records):
        summary = records[1]["data"]["checksums"]["/work/main/pyproject.toml"]
        summary["files"]["pyproject.toml"], summary["digest"] = "f" * 64, "0" * 64
    c = collected(changed, checksum_paths=("/work/main/pyproject.toml",))
    found = [f for f in failures(c) if f.check == "data"]
    assert [f.message for f in found] == ["/work/main/pyproject.toml differs from gpu1's: 1 differ: pyproject.toml"]


def test_model_dir_difference_names_the_files():
    from deepfleet.fleet.data_checks import describe_difference

    reference = {"exists": True, "files": {f"shard-{i}": "a" for i in range(5)} | {"config.json": "c"},
                 "links": {"latest": "shard-0"}}
    other = {"exists": True, "files": {f"shard-{i}": "b" for i in range(4)} | {"notes.txt": "n"}, "links": {}}
    assert describe_difference(reference, other) == ("4 differ: shard-0, shard-1, shard-2 and 1 more; "
                                                     "2 missing: config.json, shard-4; 1 extra: notes.txt; "
                                                     "1 links differ: latest")
    assert describe_difference(reference, {"exists": False}) == "missing"


def test_infiniband_proposes_nccl_variables():
    def ib(records):
        for r in records:
            r["data"]["infiniband"] = [{"device": "mlx5_0", "port": "1", "state": "4: ACTIVE",
                                        "link_layer": "InfiniBand"}]
    assert any("NCCL_IB_HCA=mlx5_0" in f.message for f in run_checks(collected(ib)))


def test_fabric_choice_is_the_same_for_every_host():
    active = {"device": "mlx5_0", "port": "1", "state": "4: ACTIVE", "link_layer": "InfiniBand"}
    roce = {"device": "mlx5_2", "port": "1", "state": "4: ACTIVE", "link_layer": "Ethernet"}
    down = {"device": "mlx5_1", "port": "1", "state": "1: DOWN", "link_layer": "InfiniBand"}
    assert choose_fabric({"a": [active], "b": [active, down]}).env == {"NCCL_IB_HCA": "mlx5_0"}
    assert choose_fabric({"a": [roce], "b": [roce]}).env == {"NCCL_IB_HCA": "mlx5_2", "NCCL_IB_GID_INDEX": "3"}
    mixed = choose_fabric({"a": [active], "b": [down], "c": []})
    assert mixed.env == {"NCCL_IB_DISABLE": "1"} and "not on b, c" in mixed.note
    assert choose_fabric({"a": [], "b": []}).env == {}


def test_record_round_trip():
    facts = HostFacts.from_record(RECORDED["facts"][0])
    assert HostFacts.from_record(facts.to_record()) == facts
    unreachable = replace(facts, data=None, failure=SshFailure(kind="timeout", what="timed out", fix="x"))
    assert HostFacts.from_record(unreachable.to_record()).failure.kind == "timeout"


def test_record_leaves_secret_values_out():
    facts = HostFacts.from_record(RECORDED["facts"][0])
    with_env = replace(facts, host=replace(facts.host, env=(("HF_TOKEN", "hf_live_1"), ("NCCL_DEBUG", "INFO"))))
    record = with_env.to_record()
    assert record["host"]["env"] == [["HF_TOKEN", "****"], ["NCCL_DEBUG", "INFO"]]
    assert "hf_live_1" not in json.dumps(record)


def test_output_dir_seen_by_the_heads_own_host_only_is_not_shared():
    """Doctor run on node 0: that host always sees the head's token; that alone is not sharing."""
    def unshared_elsewhere(records):
        records[1]["data"]["share_token_seen"] = False
    found = [f for f in run_checks(collected(unshared_elsewhere, head_hosts=frozenset({"gpu1"})))
             if f.check == "output-dir"]
    assert [(f.severity, "NOT shared" in f.message) for f in found] == [("warn", True)]


def test_a_bridge_every_host_has_is_never_the_proposed_interface():
    def with_virbr0(records):
        for r in records:
            r["data"]["interfaces"].append({"name": "virbr0", "address": "192.168.122.1", "prefix": 24, "up": True})
    text = " | ".join(f.message for f in run_checks(collected(with_virbr0)) if f.check == "interface")
    assert "NCCL_SOCKET_IFNAME=eth0" in text and "virbr0" not in text


def test_equal_subnets_tie_break_on_the_addresses_the_fleet_uses():
    from deepfleet.fleet.network import select_shared_interface

    def host(octet):
        return [{"name": "eth0", "address": f"10.0.0.{octet}", "prefix": 16, "up": True},
                {"name": "docker0", "address": f"172.17.0.{octet}", "prefix": 16, "up": True}]
    choice = select_shared_interface({"a": host(1), "b": host(2)}, fleet_addresses={"a": "10.0.0.1", "b": "10.0.0.2"})
    assert choice.per_host == {"a": "eth0", "b": "eth0"}


def test_gpu_host_whose_torch_cannot_use_them_fails():
    def cpu_torch(records):
        for r in records:
            r["data"]["accelerators"] = {"count": 8, "models": ["NVIDIA H100"] * 8, "cuda": None, "nccl": None,
                                         "torch_sees": 0}
        records[0]["data"]["accelerators"].update(cuda="12.4", nccl="2.21.5", torch_sees=8)
    found = [f for f in failures(collected(cpu_torch)) if f.check == "accelerators"]
    assert [(f.host, "CPU-only build" in f.message) for f in found] == [("gpu2", True)]


def test_gpu_host_without_nvidia_smi_is_still_a_gpu_host():
    def no_smi(records):
        for r in records:
            r["data"]["accelerators"] = {"count": 8, "models": [], "cuda": "12.4", "nccl": "2.21.5", "torch_sees": 8}
        records[0]["data"]["accelerators"]["models"] = ["NVIDIA H100"] * 8
    assert not [f for f in failures(collected(no_smi)) if f.check == "accelerators"]


def test_infiniband_on_some_hosts_only_fails_and_says_disable_it_everywhere():
    def one_hca(records):
        records[0]["data"]["infiniband"] = [{"device": "mlx5_0", "port": "1", "state": "4: ACTIVE",
                                             "link_layer": "InfiniBand"},
                                            {"device": "mlx5_1", "port": "1", "state": "1: DOWN",
                                             "link_layer": "InfiniBand"}]
    found = [f for f in run_checks(collected(one_hca)) if f.check == "infiniband"]
    assert [(f.host, f.severity) for f in found] == [("gpu2", "fail"), ("(fleet)", "ok")]
    assert "NCCL_IB_DISABLE=1 on every host" in found[0].fix
    assert "NCCL_IB_DISABLE=1 on every host" in found[-1].message and "mlx5" not in found[-1].message


def test_python_patch_difference_is_a_warning_minor_difference_fails():
    def patch(records):
        records[1]["data"]["python"]["version"] = "3.11.9"
    def minor(records):
        records[1]["data"]["python"]["version"] = "3.12.1"
    assert [f.severity for f in run_checks(collected(patch)) if f.check == "python"] == ["warn"]
    assert [f.severity for f in run_checks(collected(minor)) if f.check == "python"] == ["fail"]


def test_editable_install_is_not_reported_as_shadowed():
    def editable(records):
        records[1]["data"]["packages"]["peft"].update(origin="/src/peft/src/peft/__init__.py", editable=True)
    def shadowed(records):
        records[1]["data"]["packages"]["peft"].update(origin="/work/main/.venv/lib/python3.11/site-packages2/peft.py")
    assert not [f for f in run_checks(collected(editable)) if "loads" in f.message]
    assert [f.host for f in run_checks(collected(shadowed)) if "loads" in f.message] == ["gpu2"]


def test_host_whose_addresses_could_not_be_listed_is_a_warning_not_a_missing_subnet():
    def no_ip(records):
        records[1]["data"]["interfaces"] = None
    found = [f for f in run_checks(collected(no_ip)) if f.check == "interface"]
    assert [(f.host, f.severity) for f in found] == [("gpu2", "warn")]


def test_clock_skew_bounds_use_each_hosts_own_ssh_start():
    """A host whose ssh started 0.9 s after the first must not look 0.9 s ahead."""
    from deepfleet.fleet.facts import facts_from_result
    from deepfleet.fleet.inventory import Host
    from deepfleet.fleet.ssh import RemoteResult
    probe = json.dumps({"time_start": 1000.95, "time_end": 1001.05})
    result = RemoteResult(host=Host(name="late", address="10.0.0.9"), argv=[], returncode=0, stdout=probe, stderr="",
                          seconds=0.2, started_at=1000.9)
    low, high = facts_from_result(result).skew_bounds()
    assert low <= 0 <= high


def build_facts(*, prebuilt=(), nvcc="12.8", ninja=True, libaio=False, torch="2.13", cuda="12.8"):
    """Hand-written `build` facts of a GPU host, in the probe's shape (remote_probe_build.build_facts)."""
    return {"cuda_home": "/usr/local/cuda" if nvcc else None, "cuda_headers": bool(nvcc),
            "nvcc": {"path": "/usr/local/cuda/bin/nvcc", "version": nvcc} if nvcc else None,
            "ninja": "/usr/bin/ninja" if ninja else None, "ninja_in_env": "/work/main/.venv/bin/ninja",
            "cxx": "/usr/bin/c++", "python_headers": True,
            "libaio": {"header": "/usr/include/libaio.h", "library": "/usr/lib/x86_64-linux-gnu/libaio.so"} if libaio
            else {"header": None, "library": None},
            "deepspeed_ops": {"prebuilt": sorted(prebuilt), "accelerator": "cuda", "torch": torch, "cuda": cuda,
                              "hip": "0.0"}}


def gpu_hosts(**build):
    def mutate(records):
        for r in records:
            r["data"]["accelerators"] = {"count": 1, "vendor": "nvidia", "models": ["NVIDIA H100 80GB HBM3"],
                                         "memory_bytes": [81559 << 20], "compute_capability": ["9.0"],
                                         "cuda": "12.8", "nccl": "2.27.3", "hip": None, "torch_sees": 1}
            r["data"]["packages"]["torch"]["version"] = "2.13.0+cu128"
            r["data"]["build"] = build_facts(**build)
    return mutate


def ops_findings(mutate):
    return {(f.message.split()[0], f.host): f for f in run_checks(collected(mutate)) if f.check == "deepspeed-ops"}


def test_ops_all_prebuilt_is_one_ok_line_per_op():
    found = ops_findings(gpu_hosts(prebuilt={"cpu_adam", "fused_adam", "async_io", "pin_memory"}))
    assert sorted(found) == [("async_io", "(fleet)"), ("cpu_adam", "(fleet)"), ("fused_adam", "(fleet)")]
    assert all(f.severity == "ok" and "prebuilt (" in f.message and not f.fix for f in found.values())


def test_ops_not_prebuilt_but_nvcc_and_ninja_build_at_first_use():
    found = ops_findings(gpu_hosts())
    cpu_adam, fused_adam, async_io = (found[(op, "(fleet)")] for op in ("cpu_adam", "fused_adam", "async_io"))
    assert cpu_adam.severity == "ok" and "built at first use with c++, ninja (optimizer offload)" in cpu_adam.message
    assert cpu_adam.fix.startswith("optional") and "DS_BUILD_CPU_ADAM=1 /work/main/.venv/bin/python -m pip install" \
        in cpu_adam.fix and cpu_adam.fix.endswith("deepspeed==0.19.8")
    assert "nvcc 12.8" in fused_adam.message and fused_adam.severity == "ok"
    assert (async_io.severity, async_io.fix) == ("ok", "apt install libaio-dev") and "no libaio-dev" in async_io.message


def test_ops_without_nvcc_or_ninja_warn_only_for_what_deepfleet_may_choose():
    found = ops_findings(gpu_hosts(nvcc=None, ninja=False))
    assert "fail" not in {f.severity for f in found.values()}   # doctor does not know if the run offloads
    cpu_adam, fused_adam = found[("cpu_adam", "(fleet)")], found[("fused_adam", "(fleet)")]
    assert cpu_adam.severity == "warn" and "cannot be built here, no ninja on PATH" in cpu_adam.message
    assert "apt install ninja-build (torch runs `ninja` from PATH; /work/main/.venv/bin/ninja is not on it)" \
        == cpu_adam.fix
    assert fused_adam.severity == "ok" and "no ninja on PATH, CUDA_HOME with the CUDA headers, nvcc (" in fused_adam.message
    assert "install the CUDA toolkit for CUDA 12.8" in fused_adam.fix and "only a DeepSpeed JSON" in fused_adam.message


def test_ops_prebuilt_for_another_torch_or_nvcc_of_another_cuda_major():
    found = ops_findings(gpu_hosts(prebuilt={"cpu_adam"}, torch="2.4", nvcc="13.0"))
    refused = found[("cpu_adam", "(fleet)")]
    assert refused.severity == "warn" and "prebuilt for torch 2.4, torch here is 2.13" in refused.message
    assert refused.fix.startswith("rebuild it for this torch: DS_BUILD_CPU_ADAM=1")
    assert "nvcc for CUDA 12.8 (found 13.0)" in found[("fused_adam", "(fleet)")].message


def test_ops_that_differ_between_hosts_are_reported_per_host_and_cpu_hosts_skip_fused_adam():
    def one_prebuilt(records):
        gpu_hosts()(records)
        records[0]["data"]["build"]["deepspeed_ops"]["prebuilt"] = ["cpu_adam"]
    found = ops_findings(one_prebuilt)
    assert ("cpu_adam", "gpu1") in found and ("cpu_adam", "gpu2") in found and ("fused_adam", "(fleet)") in found

    def cpu_hosts(records):
        for r in records:
            r["data"]["build"] = {**build_facts(nvcc=None), "deepspeed_ops": {"prebuilt": [], "accelerator": "cpu",
                                                                              "torch": "0.0", "cuda": "0.0"}}
    assert sorted(op for op, _ in ops_findings(cpu_hosts)) == ["async_io", "cpu_adam"]


def test_amd_host_with_a_rocm_torch_is_a_gpu_host():
    def amd(records):
        for r in records:
            r["data"]["accelerators"] = {"count": 8, "vendor": "amd", "models": ["AMD Instinct MI300X"] * 8,
                                         "memory_bytes": [205822885888] * 8, "compute_capability": [None] * 8,
                                         "cuda": None, "hip": "6.4.43482", "nccl": "2.26.6", "torch_sees": 8}
            r["host"]["slots"] = 8
    assert not [f for f in failures(collected(amd)) if f.check == "accelerators"]


def test_hosts_without_slots_get_one_rank_per_gpu():
    def unset(records):
        for r in records:
            r["host"]["slots"] = None
            r["data"]["accelerators"] = {"count": 4, "models": ["NVIDIA L4"] * 4, "cuda": "12.4", "nccl": "2.21.5",
                                         "torch_sees": 4}
    found = [f for f in run_checks(collected(unset)) if f.check == "accelerators"]
    assert {(f.severity, f.message) for f in found} == {("ok", "4 GPU(s), one rank each")}


def test_a_slow_reverse_lookup_on_the_master_is_a_warning_naming_the_address_and_hosts_file():
    listener = {**RECORDED["listener"], "reverse_lookup": {"10.213.242.2": 0.01, "10.213.242.3": None}}
    found = [f for f in run_checks(collected(listener=listener)) if f.check == "reverse-dns"]
    assert [(f.host, f.severity) for f in found] == [("gpu1", "warn")]
    assert "10.213.242.3 over 3 s" in found[0].message and "10.213.242.2" not in found[0].message
    assert "/etc/hosts on gpu1" in found[0].fix
    quick = {**RECORDED["listener"], "reverse_lookup": {"10.213.242.2": 0.01, "10.213.242.3": 0.02}}
    assert [f.severity for f in run_checks(collected(listener=quick)) if f.check == "reverse-dns"] == ["ok"]
