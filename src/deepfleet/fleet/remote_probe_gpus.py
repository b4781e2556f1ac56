"""Probe part that runs ON each host (stdlib only, Python >= 3.8): the GPUs, as the planner needs them.

The head sends this file's text ahead of remote_probe.py's. `accelerator_facts()` returns per-GPU lists
in one order, one entry per GPU (None where the tool gave no value):
  {"count", "vendor": "nvidia" | "amd" | None, "models", "memory_bytes", "compute_capability",
   "cuda", "nccl", "hip", "torch_sees" | "torch_error"}
torch is imported only when a GPU exists (it costs seconds), to say which CUDA/ROCm build it is.
"""

import json
import os
import re
import shutil
import subprocess

MIB = 1 << 20
# Drivers that predate compute_cap (before ~510) reject the whole query; the second one works on all.
NVIDIA_QUERIES = ("name,memory.total,compute_cap", "name,memory.total")
ROCM_NAME_KEYS = ("Card series", "Card Series", "Card model", "Card SKU")


def _no_gpus():
    return {"models": [], "memory_bytes": [], "compute_capability": []}


def parse_nvidia_smi(out, with_compute_cap=True):
    """`nvidia-smi --query-gpu=name,memory.total[,compute_cap] --format=csv,noheader,nounits` -> per-GPU
    lists. memory.total is MiB; "[N/A]" (or a missing column) becomes None."""
    gpus = _no_gpus()
    for line in out.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.rsplit(",", 2 if with_compute_cap else 1)] + ["", ""]
        gpus["models"].append(fields[0])
        gpus["memory_bytes"].append(int(fields[1]) * MIB if fields[1].isdigit() else None)
        capability = fields[2] if with_compute_cap else ""
        gpus["compute_capability"].append(capability if re.match(r"^\d+\.\d+$", capability) else None)
    return gpus


def nvidia_gpus():
    for query in NVIDIA_QUERIES:
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=" + query, "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            break
        if done.returncode == 0 and "valid field" not in done.stdout:
            return parse_nvidia_smi(done.stdout, with_compute_cap="compute_cap" in query)
    return _no_gpus()


def _card_order(key):
    number = key[len("card"):]
    return (0, int(number)) if number.isdigit() else (1, key)


def _json_object(text):
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def parse_rocm_smi(product_json, memory_json):
    """`rocm-smi --showproductname --json` and `rocm-smi --showmeminfo vram --json` -> per-GPU lists, cards
    in index order. Both are {"card0": {...}, ...}; names under "Card series" (else model, SKU), memory
    as a byte string under "VRAM Total Memory (B)". AMD GPUs have no CUDA compute capability."""
    products, memory = _json_object(product_json), _json_object(memory_json)
    cards = sorted({key for key in list(products) + list(memory) if key.startswith("card")}, key=_card_order)
    gpus = _no_gpus()
    for card in cards:
        product, vram = products.get(card) or {}, memory.get(card) or {}
        names = [str(product[key]).strip() for key in ROCM_NAME_KEYS if str(product.get(key) or "").strip()]
        total = str(vram.get("VRAM Total Memory (B)", "")).strip()
        gpus["models"].append(names[0] if names else "AMD GPU")
        gpus["memory_bytes"].append(int(total) if total.isdigit() else None)
        gpus["compute_capability"].append(None)
    return gpus


def _rocm_smi_json(*flags):
    try:
        return subprocess.run(["rocm-smi", *flags, "--json"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def amd_gpus():
    return parse_rocm_smi(_rocm_smi_json("--showproductname"), _rocm_smi_json("--showmeminfo", "vram"))


def torch_gpu_facts():
    """Which GPU build torch is; what it fails with, if it does."""
    facts = {}
    try:
        import torch
        facts["cuda"], facts["hip"] = torch.version.cuda, getattr(torch.version, "hip", None)
        facts["torch_sees"] = torch.cuda.device_count()
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:
        facts["torch_error"] = str(exc)[:200]
    return facts


def accelerator_facts():
    gpus_dir = "/proc/driver/nvidia/gpus"
    facts = dict(count=0, vendor=None, cuda=None, nccl=None, **_no_gpus())
    nvidia = len(os.listdir(gpus_dir)) if os.path.isdir(gpus_dir) else 0
    if nvidia:
        facts.update(count=nvidia, vendor="nvidia")
        if shutil.which("nvidia-smi"):
            facts.update(nvidia_gpus())
    elif os.path.exists("/dev/kfd") and shutil.which("rocm-smi"):   # best effort: rocm-smi's JSON has moved
        amd = amd_gpus()
        if amd["models"]:
            facts.update(amd, count=len(amd["models"]), vendor="amd")
    if facts["count"]:
        facts.update(torch_gpu_facts())
    return facts
