"""Recorded probe facts of GPU hosts, as `deepfleet doctor --record` writes them (this machine has no
GPU): each GPU decision is tested on the facts a real fleet reports."""

from __future__ import annotations

import json
from pathlib import Path

MiB = 2**20
# name, memory.total (MiB) and compute_cap as `nvidia-smi --query-gpu=name,memory.total,compute_cap` prints them
H100 = ("NVIDIA H100 80GB HBM3", 81559, "9.0")
A100 = ("NVIDIA A100-SXM4-80GB", 81920, "8.0")
A100_40 = ("NVIDIA A100-SXM4-40GB", 40960, "8.0")
V100 = ("Tesla V100-SXM2-32GB", 32768, "7.0")


def _package(version: str | None) -> dict:
    return {"version": version, "origin": None, "dist_path": "/opt/venv/lib/python3.11/site-packages",
            "editable": False}


def host_record(name: str, address: str, *, gpu=H100, gpus: int = 8, slots: int | None = None,
                flash_attn: bool = True, infiniband: bool = True, bandwidth_gbps: float | None = None,
                memory_gib: int = 1800, ib_address: str | None = None, prebuilt_ops: tuple[str, ...] = ()) -> dict:
    """One host's record: `gpus` GPUs of model `gpu` (gpus=0: a CPU host), an Ethernet address on
    10.1.0.0/24 and, with `infiniband`, an active IB port with IPoIB on 192.168.100.0/24."""
    model, memory_mib, capability = gpu
    interfaces = [{"name": "lo", "address": "127.0.0.1", "prefix": 8, "up": True},
                  {"name": "eth0", "address": address, "prefix": 24, "up": True}]
    if infiniband:
        interfaces.append({"name": "ib0", "address": ib_address or address.replace("10.1.0.", "192.168.100."),
                           "prefix": 24, "up": True})
    data = {
        "hostname": name, "python": {"executable": "/opt/venv/bin/python", "version": "3.11.9",
                                     "wanted": "/opt/venv/bin/python", "wanted_found": True},
        "packages": {"torch": _package("2.13.0+cu126" if gpus else "2.13.0+cpu"), "deepspeed": _package("0.19.8"),
                     "transformers": _package("5.23.0"), "accelerate": _package("1.15.0"),
                     "peft": _package("0.21.2"), "flash_attn": _package("2.8.3" if flash_attn else None),
                     "bitsandbytes": _package("0.48.1")},
        "accelerators": {"count": gpus, "models": [model] * gpus, "memory_bytes": [memory_mib * MiB] * gpus,
                         "compute_capability": [capability] * gpus, "vendor": "nvidia" if gpus else None,
                         "cuda": "12.6" if gpus else None, "nccl": "2.27.5" if gpus else None, "torch_sees": gpus},
        "memory_available_bytes": memory_gib * 2**30, "cpu_count": 192, "interfaces": interfaces,
        "infiniband": [{"device": "mlx5_0", "port": "1", "state": "4: ACTIVE", "link_layer": "InfiniBand"}]
        if infiniband else [],
        "build": {"cuda_home": "/usr/local/cuda" if gpus else None, "nvcc": None, "ninja": None, "cxx": "/usr/bin/c++",
                  "deepspeed_ops": {"prebuilt": sorted(prebuilt_ops), "accelerator": "cuda", "torch": "2.13",
                                    "cuda": "12.6", "hip": "0.0"}},
        "network": {"hops": {}, "master": None,
                    "bandwidth": {"tool": "iperf3", "gbit_s": bandwidth_gbps} if bandwidth_gbps else None},
    }
    host = {"name": name, "address": address, "user": None, "port": None, "slots": slots, "interface": None,
            "python": None, "env": [], "local": False}
    return {"host": host, "data": data, "failure": None, "error": None, "sent_at": 0.0, "received_at": 0.1,
            "seconds": 0.1}


def write_fleet(directory: Path, records: list[dict], name: str = "fleet") -> tuple[Path, Path]:
    """fleet.yaml (hosts by name and address, no slots: one rank per GPU) and the doctor record beside it."""
    fleet = directory / f"{name}.yaml"
    fleet.write_text("python: /opt/venv/bin/python\nhosts:\n" + "".join(
        f"  - {{name: {r['host']['name']}, address: {r['host']['address']}"
        + (f", slots: {r['host']['slots']}" if r["host"]["slots"] else "") + "}\n" for r in records))
    facts = directory / f"{name}-facts.json"
    facts.write_text(json.dumps(records))
    return fleet, facts
