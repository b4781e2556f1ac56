"""The hardware a run is planned and launched for: this machine alone, or every host's own facts
(asked over ssh in one probe round trip, or read from a `deepfleet doctor --record` file). A head
without GPUs, such as a login node, thus plans a GPU fleet from the GPU hosts, not from itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.discover import probe_fleet, read_facts_record
from deepfleet.fleet.doctor_store import load_doctor_facts
from deepfleet.fleet.host_hardware import HostHardware, hardware_from_facts, local_hardware, measured_link_gbps, \
    with_slots
from deepfleet.fleet.inventory import Fleet
from deepfleet.fleet.network import InterfaceChoice
from deepfleet.fleet.ssh import options_for
from deepfleet.launch.run import interface_from_facts
from deepfleet.launch.training import cpu_threads_per_rank, is_local_only, training_fleet
from deepfleet.plan.choose import FleetShape

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class FleetHardware:
    fleet: Fleet                          # every host's slots known
    hosts: tuple[HostHardware, ...]       # in fleet order
    source: str                           # where the facts came from, for the plan's header
    interface: InterfaceChoice | None = None   # the subnet the hosts share (several hosts)
    link_gbps: float | None = None        # doctor's measured host->head bandwidth (its record, or its last run)
    link_source: str | None = None        # where link_gbps comes from, for the plan's summary
    held: dict[str, dict[str, dict]] | None = None   # host -> path -> content summary of the checked paths

    @property
    def accelerator(self) -> str:
        return "cuda" if self.hosts and all(h.gpu_count for h in self.hosts) else "cpu"

    @property
    def prebuilt_ops(self) -> frozenset[str]:
        """DeepSpeed ops prebuilt on every host (the ranks check their own again at start)."""
        return frozenset.intersection(*(h.prebuilt_ops for h in self.hosts)) if self.hosts else frozenset()

    @property
    def world_size(self) -> int:
        return sum(host.slots or 0 for host in self.fleet.hosts)

    def rank_layout(self) -> dict[str, int | None]:
        """FleetShape's rank fields: hosts, the most ranks on one host, and their sum when hosts differ."""
        slots = [host.slots or 1 for host in self.fleet.hosts]
        return {"nodes": len(slots), "ranks_per_node": max(slots),
                "total_ranks": sum(slots) if len(set(slots)) > 1 else None}

    def cpu_threads(self) -> int | None:
        """OMP_NUM_THREADS per rank on CPU hosts: the smallest host's cores over its ranks."""
        if self.accelerator != "cpu":
            return None
        return min(cpu_threads_per_rank(cpu_count=h.cpu_count or 1, nproc=host.slots or 1)
                   for host, h in zip(self.fleet.hosts, self.hosts))

    def shape(self) -> FleetShape:
        """What the planner needs: ranks, the smallest memory of any rank and host, bf16 on every GPU."""
        host_memory = [h.host_memory_bytes for h in self.hosts if h.host_memory_bytes]
        smallest_host = min(host_memory) if len(host_memory) == len(self.hosts) else None
        if self.accelerator == "cuda":
            unknown = [h.name for h in self.hosts if not h.gpu_memory_bytes]
            if unknown:
                raise DeepfleetError(f"GPU memory of host(s) {', '.join(unknown)} unknown", where=self.source,
                                     fix="check that nvidia-smi (or rocm-smi) answers there: deepfleet doctor")
            device_memory = min(h.gpu_memory_bytes or 0 for h in self.hosts)
        elif smallest_host is None:
            raise DeepfleetError("memory of the CPU hosts unknown", where=self.source,
                                 fix="check /proc/meminfo there: deepfleet doctor")
        else:
            device_memory = smallest_host
        return FleetShape(**self.rank_layout(), accelerator=self.accelerator,  # type: ignore[arg-type]
                          device_memory_bytes=device_memory, host_memory_bytes=smallest_host,
                          bf16_supported=self.accelerator == "cuda" and all(h.bf16 for h in self.hosts),
                          inter_host_gbps=self.link_gbps)

    def describe(self) -> str:
        """e.g. `2 host(s): 8 rank(s) on 8 x NVIDIA H100 80GB HBM3 (80 GiB, bf16) per host, from the hosts' probe`."""
        kinds = sorted({(host.slots, h.gpu_count, h.gpu_model, h.gpu_memory_bytes, h.bf16)
                        for host, h in zip(self.fleet.hosts, self.hosts)}, key=str)
        parts = []
        for slots, gpus, model, memory, bf16 in kinds:
            parts.append(f"{slots} rank(s) on {gpus} x {model} ({(memory or 0) / GiB:.0f} GiB"
                         f"{', bf16' if bf16 else ''})" if gpus else f"{slots} CPU rank(s)")
        return f"{len(self.hosts)} host(s): {'; '.join(parts)} per host, from {self.source}"


def fleet_hardware(fleet: Fleet, *, nproc: int | None = None, facts_file: str | None = None,
                   checksum_paths: tuple[str, ...] = (), probe_timeout: float = 30.0) -> FleetHardware:
    """The fleet's hardware (`nproc`: ranks per host, overriding slots). This machine alone is asked
    directly; other hosts through their probe facts, or `facts_file`. The probe also summarises the
    content of `checksum_paths` on every host (`held`), in the same round trip."""
    if nproc:
        fleet = replace(fleet, hosts=tuple(replace(h, slots=nproc) for h in fleet.hosts))
    if is_local_only(fleet) and facts_file is None:
        found = local_hardware(fleet.hosts[0].name)
        return FleetHardware(fleet=with_slots(training_fleet(fleet, nproc=nproc, gpus=found.gpu_count), [found]),
                             hosts=(found,), source="this machine")
    facts = read_facts_record(facts_file, fleet) if facts_file else probe_fleet(fleet, options_for(fleet),
                                                                                 checksum_paths=checksum_paths,
                                                                                 timeout=probe_timeout)
    hosts = tuple(hardware_from_facts(f) for f in facts)
    link_gbps, link_source = measured_link_gbps(facts), facts_file
    if link_gbps is None and (stored := load_doctor_facts(fleet)):
        link_gbps = measured_link_gbps(stored.facts)
        link_source = f"deepfleet doctor, {time.strftime('%Y-%m-%d %H:%M', time.localtime(stored.saved_at))}"
    return FleetHardware(fleet=with_slots(fleet, hosts), hosts=hosts,
                         source=facts_file or "the hosts' probe", interface=interface_from_facts(fleet, facts),
                         link_gbps=link_gbps, link_source=link_source if link_gbps else None,
                         held=None if facts_file else {f.host.name: f.get("checksums", default={}) or {} for f in facts})
