"""Pick the fastest ZeRO setting that fits, with a micro batch that hits the global batch exactly.

Order (first that fits wins): ZeRO-0, 1, 2 move the gradient bytes of plain data parallelism per
reduction; ZeRO-3 adds a parameter all-gather in forward and backward (about 1.5x the traffic);
offloading adds host<->device copies and a CPU optimizer step. Across hosts on a slow link ZeRO-3 is
the worst of these (users report 10-20x slowdowns), so there optimizer offload is tried first.

With gradient accumulation ZeRO-0/1 reduce once per step, while ZeRO-2 and 3 reduce on every micro
batch: their gradients are partitioned (DeepSpeed's engine: "ZeRO stage >= 2 communicates during non
gradient accumulation boundaries as well"). So within the first tier the lowest stage that fits at the
largest micro batch wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from deepfleet.errors import DeepfleetError
from deepfleet.plan.memory import (OFFLOADS, STAGES, ActivationBytes, ModelShape, ModelStateBytes, Offload,
                                   Precision, estimate_activation_bytes, estimate_model_state_bytes,
                                   is_valid_zero_setting, uses_chunked_loss)

# Links slower than this (Gbit/s, measured by doctor / bench comm) make ZeRO-3 across hosts slow;
# 100 Gbit/s InfiniBand/RoCE is where multi-node ZeRO-3 starts to pay off in DeepSpeed's own reports.
SLOW_LINK_GBPS = 50.0
# Share of device memory the plan may fill: the rest covers the CUDA context, allocator fragmentation
# and temporary buffers that no estimate sees.
USABLE_DEVICE_FRACTION = 0.9
USABLE_HOST_FRACTION = 0.9
# With overlap_comm, DeepSpeed keeps about 4.5x the reduce and all-gather bucket sizes (HF DeepSpeed guide).
OVERLAP_BUFFER_FACTOR = 4.5

# Settings in tiers of equal communication, fastest tier first. Within a tier the largest micro batch
# that fits wins, then the lowest stage (less bookkeeping) at that micro batch.
Setting = tuple[int, Offload]
SAME_TRAFFIC_AS_DATA_PARALLEL: tuple[Setting, ...] = ((0, "none"), (1, "none"), (2, "none"))
FAST_LINK_TIERS: tuple[tuple[Setting, ...], ...] = (
    SAME_TRAFFIC_AS_DATA_PARALLEL, ((3, "none"),), ((2, "optimizer"),), ((3, "optimizer"),),
    ((3, "optimizer+params"),),
)
SLOW_LINK_TIERS: tuple[tuple[Setting, ...], ...] = (
    SAME_TRAFFIC_AS_DATA_PARALLEL, ((2, "optimizer"),), ((3, "none"),), ((3, "optimizer"),),
    ((3, "optimizer+params"),),
)


@dataclass(frozen=True, kw_only=True)
class FleetShape:
    """What the planner needs to know about the fleet."""
    nodes: int
    ranks_per_node: int                   # the most ranks on one host (what host memory must hold)
    accelerator: Literal["cuda", "cpu"]
    device_memory_bytes: int              # per GPU; for CPU ranks: the host's memory
    host_memory_bytes: Optional[int]      # per host; None when unknown (host memory not checked)
    bf16_supported: bool = False
    inter_host_gbps: Optional[float] = None   # measured; None when not measured
    total_ranks: Optional[int] = None     # hosts with different rank counts (8 + 4): their sum

    @property
    def world_size(self) -> int:
        return self.total_ranks or self.nodes * self.ranks_per_node

    @property
    def slow_link(self) -> bool:
        return self.nodes > 1 and self.inter_host_gbps is not None and self.inter_host_gbps < SLOW_LINK_GBPS


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The recipe's side of the plan."""
    global_batch: int
    micro_batch: int          # the most the recipe asks for per rank per forward
    seq_len: int
    precision: Precision
    gradient_checkpointing: bool
    eager_attention: bool = False
    chunked_loss: Union[Literal["auto"], bool] = False   # train.chunked_loss; auto is on for CPU ranks only


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """One ZeRO setting at one micro batch: what it needs and whether it fits."""
    states: ModelStateBytes
    activation_bytes: int
    buffer_bytes: int
    rank_bytes: int          # everything on one rank's device
    host_bytes: int          # everything on one host's CPU memory
    fits: bool
    limit: str               # what does not fit, or ""

    @property
    def stage(self) -> int:
        return self.states.stage

    @property
    def offload(self) -> Offload:
        return self.states.offload


@dataclass(frozen=True, kw_only=True)
class ZeroChoice:
    stage: int
    offload: Offload
    micro_batch: int
    grad_accum: int
    reason: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Plan:
    shape: ModelShape
    fleet: FleetShape
    workload: Workload
    activations: ActivationBytes          # at the chosen micro batch
    rows: tuple[PlanRow, ...]             # every valid setting at the chosen micro batch
    choice: ZeroChoice


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def solve_batch_layout(*, global_batch: int, micro_batch: int, world_size: int) -> BatchLayout:
    """Gradient accumulation that makes micro x accumulation x world equal the global batch exactly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise DeepfleetError(
            f"train.global_batch {global_batch} is not micro_batch {micro_batch} x world size {world_size} "
            f"x an integer accumulation",
            where="train.global_batch",
            fix=f"use train.global_batch={lower} or {lower + per_step}, or change train.micro_batch",
        )
    return BatchLayout(micro_batch=micro_batch, grad_accum=global_batch // per_step, world_size=world_size)


def bucket_elements(shape: ModelShape) -> int:
    """Reduce/all-gather bucket size: hidden^2, the value HF's "auto" fills in for reduce_bucket_size."""
    return shape.hidden_size * shape.hidden_size


def micro_batch_candidates(*, global_batch: int, world_size: int, most: int) -> list[int]:
    """Micro batches <= `most` for which micro x accumulation x world equals the global batch, largest first."""
    if global_batch % world_size:
        raise DeepfleetError(
            f"train.global_batch {global_batch} cannot be split evenly over {world_size} ranks",
            where="train.global_batch",
            fix=f"use a multiple of {world_size}, e.g. "
                f"train.global_batch={max(world_size, global_batch // world_size * world_size)}")
    per_rank = global_batch // world_size
    return [m for m in range(min(most, per_rank), 0, -1) if per_rank % m == 0]


def evaluate_setting(shape: ModelShape, fleet: FleetShape, workload: Workload, *, stage: int, offload: Offload,
                     micro_batch: int) -> PlanRow:
    states = estimate_model_state_bytes(shape, stage=stage, offload=offload, nodes=fleet.nodes,
                                        ranks_per_node=fleet.ranks_per_node, precision=workload.precision,
                                        world_size=fleet.world_size)
    acts = estimate_activation_bytes(shape, micro_batch=micro_batch, seq_len=workload.seq_len,
                                     precision=workload.precision, eager_attention=workload.eager_attention,
                                     chunked_loss=uses_chunked_loss(workload.chunked_loss, fleet.accelerator))
    activation = acts.with_checkpointing if workload.gradient_checkpointing else acts.without_checkpointing
    width = 4 if workload.precision == "fp32" else 2
    buffers = int(OVERLAP_BUFFER_FACTOR * 2 * bucket_elements(shape) * width) if stage > 0 else 0
    rank = states.device_bytes + activation + buffers
    if fleet.accelerator == "cpu":  # the ranks' memory is the host's memory
        host = rank * fleet.ranks_per_node
        fits = host <= USABLE_HOST_FRACTION * fleet.device_memory_bytes
        return PlanRow(states=states, activation_bytes=activation, buffer_bytes=buffers, rank_bytes=rank,
                       host_bytes=host, fits=fits, limit="" if fits else "host memory")
    host = states.host_bytes
    device_ok = rank <= USABLE_DEVICE_FRACTION * fleet.device_memory_bytes
    host_ok = fleet.host_memory_bytes is None or host <= USABLE_HOST_FRACTION * fleet.host_memory_bytes
    limit = "" if device_ok and host_ok else ("GPU memory" if not device_ok else "host memory")
    return PlanRow(states=states, activation_bytes=activation, buffer_bytes=buffers, rank_bytes=rank,
                   host_bytes=host, fits=device_ok and host_ok, limit=limit)


def setting_tiers(fleet: FleetShape) -> tuple[tuple[Setting, ...], ...]:
    """The tiers to try, in order, for this fleet."""
    if fleet.accelerator == "cpu":  # nothing to offload to: the ranks already live in host memory
        return tuple(tier for tier in FAST_LINK_TIERS if all(offload == "none" for _, offload in tier))
    return SLOW_LINK_TIERS if fleet.slow_link else FAST_LINK_TIERS


def _reason(stage: int, offload: Offload, micro: int, workload: Workload, fleet: FleetShape) -> str:
    name = f"ZeRO-{stage}" + ("" if offload == "none" else f" with {offload} offload to CPU")
    accumulation = workload.global_batch // (micro * fleet.world_size)
    same_traffic = (stage, offload) in SAME_TRAFFIC_AS_DATA_PARALLEL
    if same_traffic and accumulation == 1:
        parts = [f"{name} fits; ZeRO-0/1/2 move the same bytes per step, the lowest stage has the least bookkeeping"]
    elif same_traffic and stage < 2:
        parts = [f"{name} fits; it reduces the gradients once per step, where ZeRO-2 would on each of the "
                 f"{accumulation} micro batches"]
    elif same_traffic:
        parts = [f"{name} is the lowest stage that fits (ZeRO-0/1 do not); it reduces the gradients on each of the "
                 f"{accumulation} micro batches"]
    else:
        parts = [f"{name} is the least communication that fits (ZeRO-0/1/2 do not)"]
    if micro < workload.micro_batch:
        parts.append(f"micro batch lowered from {workload.micro_batch} to {micro} to fit")
    if fleet.slow_link and stage < 3:
        parts.append(f"ZeRO-3 was ranked after offload because the inter-host link is slow "
                     f"({fleet.inter_host_gbps:g} Gbit/s)")
    return "; ".join(parts)


def _warnings(stage: int, fleet: FleetShape) -> tuple[str, ...]:
    if stage != 3 or fleet.nodes == 1:
        return ()
    if fleet.inter_host_gbps is None:
        return ("ZeRO-3 across hosts needs a fast link and this one has not been measured: "
                "run `deepfleet bench comm` before a long run",)
    if fleet.slow_link:
        return (f"ZeRO-3 across hosts on a {fleet.inter_host_gbps:g} Gbit/s link can be 10-20x slower than one "
                f"host: prefer more memory per host, LoRA, or gradient checkpointing",)
    return ()


def _nothing_fits(shape: ModelShape, fleet: FleetShape, workload: Workload) -> DeepfleetError:
    fixes = ["use method: lora", "add GPUs or hosts", "lower data.max_length"]
    if not workload.gradient_checkpointing:
        fixes.insert(0, "set train.gradient_checkpointing: true")
    return DeepfleetError(
        f"no ZeRO stage or offload fits {shape.total_params / 1e9:.2f}B parameters on {fleet.world_size} "
        f"rank(s) with {fleet.device_memory_bytes / 2**30:.0f} GiB each, even at micro batch 1",
        where="deepspeed.zero", fix="; or ".join(fixes))


def choose_zero_setting(shape: ModelShape, fleet: FleetShape, workload: Workload) -> Plan:
    """The first tier (in speed order) with a setting that fits, at the largest micro batch that fits and
    divides the global batch exactly, and the lowest stage of the tier at that micro batch."""
    micros = micro_batch_candidates(global_batch=workload.global_batch, world_size=fleet.world_size,
                                    most=workload.micro_batch)
    for tier in setting_tiers(fleet):
        for micro, (stage, offload) in ((m, s) for m in micros for s in tier):
            if evaluate_setting(shape, fleet, workload, stage=stage, offload=offload, micro_batch=micro).fits:
                choice = ZeroChoice(stage=stage, offload=offload, micro_batch=micro,
                                    grad_accum=workload.global_batch // (micro * fleet.world_size),
                                    reason=_reason(stage, offload, micro, workload, fleet),
                                    warnings=_warnings(stage, fleet))
                return _plan(shape, fleet, workload, choice)
    raise _nothing_fits(shape, fleet, workload)


def plan_fixed_setting(shape: ModelShape, fleet: FleetShape, workload: Workload, *, stage: int,
                       offload: Offload, source: str = "the recipe") -> Plan:
    """The table for a setting the user fixed; the choice is theirs, with a warning when it does not fit."""
    layout = solve_batch_layout(global_batch=workload.global_batch, micro_batch=workload.micro_batch,
                                world_size=fleet.world_size)
    micro = layout.micro_batch
    row = evaluate_setting(shape, fleet, workload, stage=stage, offload=offload, micro_batch=micro)
    warnings = _warnings(stage, fleet)
    if not row.fits:
        offload_text = "without offload" if offload == "none" else f"with {offload} offload"
        warnings += (f"ZeRO-{stage} {offload_text} from {source} does not fit: {row.limit}; "
                     f"set deepspeed: auto to let the planner choose",)
    choice = ZeroChoice(stage=stage, offload=offload, micro_batch=micro, grad_accum=layout.grad_accum,
                        reason=f"set in {source}", warnings=warnings)
    return _plan(shape, fleet, workload, choice)


def _plan(shape: ModelShape, fleet: FleetShape, workload: Workload, choice: ZeroChoice) -> Plan:
    rows = tuple(evaluate_setting(shape, fleet, workload, stage=s, offload=o, micro_batch=choice.micro_batch)
                 for s in STAGES for o in OFFLOADS
                 if is_valid_zero_setting(s, o) and (fleet.accelerator != "cpu" or o == "none"))
    acts = estimate_activation_bytes(shape, micro_batch=choice.micro_batch, seq_len=workload.seq_len,
                                     precision=workload.precision, eager_attention=workload.eager_attention,
                                     chunked_loss=uses_chunked_loss(workload.chunked_loss, fleet.accelerator))
    return Plan(shape=shape, fleet=fleet, workload=workload, activations=acts, rows=rows, choice=choice)
