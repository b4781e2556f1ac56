"""Each host's accelerators, read from its probe facts (or from this machine), and the fleet-wide rules
a training job needs them to follow. Pure: planning on a login node without GPUs uses the hosts'
facts, never the head's own hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from deepfleet.errors import DeepfleetError, Problem
from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.host_selection import gpu_indices
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.gpu_peaks import bf16_supported_by_name


@dataclass(frozen=True, kw_only=True)
class HostHardware:
    """What planning and launch need to know about one host."""

    name: str
    gpu_count: int                       # GPUs on the host (0: a CPU host)
    gpu_models: tuple[str, ...] = ()     # distinct model names, as nvidia-smi / rocm-smi report them
    gpu_memory_bytes: int | None = None  # the smallest GPU's memory; None when unknown
    bf16: bool = False                   # every GPU of the host does bf16
    host_memory_bytes: int | None = None # available host memory; None when unknown
    cpu_count: int | None = None
    flash_attn: bool = False             # the flash-attn package is installed
    bitsandbytes: bool = False           # the bitsandbytes package is installed (QLoRA)
    prebuilt_ops: frozenset[str] = frozenset()   # DeepSpeed ops compiled at install time (fused_adam, ...)
    trackers: frozenset[str] | None = None       # tracker libraries installed (wandb, mlflow); None: not known

    @property
    def gpu_model(self) -> str:
        return ",".join(self.gpu_models) or ("cpu" if not self.gpu_count else "GPU (model unknown)")


def bf16_capable(compute_capability: str | None, name: str, vendor: str | None) -> bool:
    """bf16 needs compute capability 8.0 (Ampere) on NVIDIA; without it (old drivers) the GPU table
    decides; an unknown NVIDIA GPU gets fp16, the choice that runs everywhere."""
    try:
        return float(compute_capability or "") >= 8.0
    except ValueError:
        pass
    known = bf16_supported_by_name(name)
    return known if known is not None else vendor == "amd"   # every AMD Instinct since MI100 has bf16


# logging.trackers name -> the distribution the probe reads (mlflow-skinny: the full mlflow requires it too)
TRACKER_DISTRIBUTIONS = {"wandb": "wandb", "mlflow": "mlflow_skinny"}


def hardware_from_facts(facts: HostFacts) -> HostHardware:
    """A host's hardware from its probe answer (`remote_probe.accelerator_facts`)."""
    accelerators = facts.get("accelerators", default={}) or {}
    count = int(accelerators.get("count") or 0)
    names = list(accelerators.get("models") or [])
    capabilities = list(accelerators.get("compute_capability") or [])
    memories = [int(m) for m in accelerators.get("memory_bytes") or [] if m]
    vendor = accelerators.get("vendor")
    bf16 = bool(count) and all(
        bf16_capable(capabilities[i] if i < len(capabilities) else None, name, vendor) for i, name in enumerate(names))
    packages = facts.get("packages", default={}) or {}
    return HostHardware(name=facts.host.name, gpu_count=count, gpu_models=tuple(sorted(set(names))),
                        gpu_memory_bytes=min(memories) if memories else None, bf16=bf16 and bool(names),
                        host_memory_bytes=facts.get("memory_available_bytes"), cpu_count=facts.get("cpu_count"),
                        flash_attn=bool((packages.get("flash_attn") or {}).get("version")),
                        bitsandbytes=bool((packages.get("bitsandbytes") or {}).get("version")),
                        prebuilt_ops=frozenset(facts.get("build", "deepspeed_ops", "prebuilt", default=None) or ()),
                        trackers=_trackers_installed(packages))


def _trackers_installed(packages: dict) -> frozenset[str] | None:
    """None for facts recorded before the probe asked (an old `doctor --record` file)."""
    if not all(dist in packages for dist in TRACKER_DISTRIBUTIONS.values()):
        return None
    return frozenset(name for name, dist in TRACKER_DISTRIBUTIONS.items() if (packages[dist] or {}).get("version"))


def local_hardware(name: str) -> HostHardware:
    """This machine, as torch sees it."""
    import importlib.util
    import os

    from deepfleet import hardware

    count = hardware.gpu_count()
    return HostHardware(name=name, gpu_count=count, gpu_models=hardware.gpu_models() if count else (),
                        gpu_memory_bytes=hardware.gpu_memory_bytes() if count else None,
                        bf16=count > 0 and hardware.gpu_bf16_supported(),
                        host_memory_bytes=hardware.host_memory_bytes(), cpu_count=os.cpu_count(),
                        flash_attn=importlib.util.find_spec("flash_attn") is not None,
                        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                        trackers=frozenset(name for name in TRACKER_DISTRIBUTIONS if importlib.util.find_spec(name)))


def default_slots(hardware: HostHardware) -> int:
    """Ranks on a host whose slots are not configured: one per GPU, or 1 on a CPU host."""
    return hardware.gpu_count or 1


def _placed(host: Host, found: HostHardware) -> tuple[Host, Problem | None]:
    indices, problem = gpu_indices(host, found.gpu_count)
    if indices is not None:   # --include / --exclude chose GPUs: one rank on each
        env = dict(host.env) | {"CUDA_VISIBLE_DEVICES": ",".join(map(str, indices))}
        return replace(host, slots=len(indices), env=tuple(sorted(env.items()))), None
    return (host if host.slots is not None else replace(host, slots=default_slots(found))), problem


def with_slots(fleet: Fleet, hardware: Sequence[HostHardware]) -> Fleet:
    """The fleet with every host's rank count known: GPUs chosen with --include/--exclude, else the
    configured `slots`, else one per GPU (1 on a CPU host)."""
    placed = [_placed(host, found) for host, found in zip(fleet.hosts, hardware)]
    if problems := [problem for _, problem in placed if problem]:
        raise DeepfleetError(problems=problems)
    return replace(fleet, hosts=tuple(host for host, _ in placed))


def _slots_problem(host: Host, found: HostHardware, where: str) -> Problem | None:
    if found.gpu_count and host.slots is not None and host.slots > found.gpu_count:
        return Problem(what=f"slots={host.slots} on host {host.name}, which has {found.gpu_count} GPU(s)",
                       where=where, fix=f"set slots: {found.gpu_count} (or leave slots out: one rank per GPU)")
    return None


def qlora_problems(hardware: Sequence[HostHardware]) -> list[Problem]:
    """QLoRA's 4-bit kernels (bitsandbytes) need a CUDA GPU and the package on every host."""
    without_gpu = [h.name for h in hardware if not h.gpu_count]
    if without_gpu:
        return [Problem(what=f"method qlora needs CUDA GPUs; host(s) {', '.join(without_gpu)} have none",
                        where="method", fix="use method: lora there, or train on GPU hosts")]
    missing = [h.name for h in hardware if not h.bitsandbytes]
    return [Problem(what=f"method qlora needs bitsandbytes, not installed on host(s) {', '.join(missing)}",
                    where="method", fix="pip install bitsandbytes in the fleet's environment on every host "
                                        "(or use method: lora)")] if missing else []


def fleet_hardware_problems(fleet: Fleet, hardware: Sequence[HostHardware], *, precision: str,
                            method: str = "full") -> list[Problem]:
    """What makes the hosts unfit to train together, one line each naming the host and the fix."""
    where = fleet.source
    problems = [p for host, found in zip(fleet.hosts, hardware) if (p := _slots_problem(host, found, where))]
    gpu_hosts = [h for h in hardware if h.gpu_count]
    cpu_hosts = [h for h in hardware if not h.gpu_count]
    if gpu_hosts and cpu_hosts:
        problems.append(Problem(
            what=f"host(s) {', '.join(h.name for h in cpu_hosts)} have no GPU, while "
                 f"{', '.join(h.name for h in gpu_hosts)} do", where=where,
            fix="train on GPU hosts only (NCCL needs a GPU per rank): remove the CPU host(s) from the fleet"))
    mixed_within = [h for h in gpu_hosts if len(h.gpu_models) > 1]
    problems += [Problem(what=f"host {h.name} mixes GPU models {', '.join(h.gpu_models)}", where=where,
                         fix="set CUDA_VISIBLE_DEVICES in the host's env: to GPUs of one model")
                 for h in mixed_within]
    models = {h.gpu_model for h in gpu_hosts if len(h.gpu_models) == 1}
    if len(models) > 1:
        order = [h.gpu_model for h in gpu_hosts]   # ties go to the first host's model
        common = max(models, key=lambda m: (order.count(m), -order.index(m)))
        problems += [Problem(what=f"host {h.name} has {h.gpu_model}, the others {common}", where=where,
                             fix="train on hosts with one GPU model (ZeRO splits work evenly, so the slowest "
                                 "GPU would set the pace and the smallest its memory): remove or replace the host")
                     for h in gpu_hosts if len(h.gpu_models) == 1 and h.gpu_model != common]
    if precision == "bf16":
        problems += [Problem(what=f"precision bf16, but host {h.name}'s {h.gpu_model} has no bf16", where="precision",
                             fix="use precision: fp16 (or auto) on these GPUs") for h in gpu_hosts if not h.bf16]
    if method == "qlora" and not problems:
        problems += qlora_problems(hardware)
    return problems


def check_fleet_hardware(fleet: Fleet, hardware: Sequence[HostHardware], *, precision: str,
                         method: str = "full") -> None:
    if problems := fleet_hardware_problems(fleet, hardware, precision=precision, method=method):
        raise DeepfleetError(problems=problems)


def measured_link_gbps(facts: Sequence[HostFacts]) -> float | None:
    """The slowest host->head bandwidth doctor measured, in Gbit/s; None when none was measured."""
    rates = [f.get("network", "bandwidth", "gbit_s") for f in facts]
    rates = [float(r) for r in rates if isinstance(r, (int, float)) and r > 0]
    return min(rates) if rates else None
