"""Head-side preparation of a training run, the same for this machine alone and for a fleet:
resolve `deepspeed: auto` once, check everything checkable before any rank starts, and build the
job every host runs. Nothing here writes anything but content manifests beside the model and data
(the cache that makes comparing them across hosts cheap).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Callable

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.data_checks import identity_problems
from deepfleet.fleet.host_hardware import HostHardware, check_fleet_hardware, local_hardware
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.remote_probe_manifest import path_summary
from deepfleet.fleet.sync import SyncReport, run_sync
from deepfleet.fleet.sources import local_host, resolve_fleet
from deepfleet.fleet_hardware import FleetHardware, fleet_hardware
from deepfleet.launch.training import TrainingJob, default_nproc, is_local_only, render_training_plan
from deepfleet.plan.choose import FleetShape
from deepfleet.plan.deepspeed_config import ResolvedDeepSpeedConfig, planning_steps, resolve_run_config
from deepfleet.plan.memory import ModelShape
from deepfleet.plan.recipe import BUILTIN_MODEL_PREFIX, Recipe

SYNC_FIX = "run `deepfleet sync {path}` with this fleet, or `deepfleet train --sync`"


@dataclass(frozen=True, kw_only=True)
class PreparedRun:
    recipe: Recipe          # what the ranks get: `deepspeed: auto` resolved
    job: TrainingJob
    hardware: FleetHardware
    shape: FleetShape       # what the planner saw of the fleet
    note: str = ""          # the planner's choice for `deepspeed: auto`, or ""

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def local(self) -> bool:
        return is_local_only(self.job.fleet)


def shape_for(recipe: Recipe) -> ModelShape:
    from deepfleet.train.model_facts import model_facts

    return model_facts(recipe).shape


def resolved_recipe_json(recipe: Recipe) -> str:
    """The recipe the ranks load: overrides applied, output_dir absolute, env left to the environment."""
    data = recipe.model_dump(mode="json", exclude={"env"})
    data["output_dir"] = str(recipe.output_path.resolve())
    return json.dumps(data, indent=2) + "\n"


def resolve_auto_zero(recipe: Recipe, fleet: FleetShape) -> tuple[Recipe, str]:
    """`deepspeed: auto`: the planner picks stage, offload and micro batch once, here, so every rank agrees."""
    if recipe.deepspeed.zero != "auto" or recipe.deepspeed.config is not None:
        return recipe, ""
    choice = resolve_run_config(recipe, world_size=fleet.world_size, total_steps=planning_steps(recipe),
                                accelerator=fleet.accelerator, bf16_supported=fleet.bf16_supported,
                                model_shape=shape_for(recipe), fleet=fleet).plan.choice
    deepspeed = recipe.deepspeed.model_copy(update={
        "zero": choice.stage,
        "offload_optimizer": "cpu" if choice.offload.startswith("optimizer") else "none",
        "offload_params": "cpu" if choice.offload.endswith("params") else "none"})
    train = recipe.train.model_copy(update={"micro_batch": choice.micro_batch})
    note = (f"deepspeed: auto -> ZeRO-{choice.stage}, offload {choice.offload}, micro batch {choice.micro_batch} "
            f"x accumulation {choice.grad_accum}: {choice.reason}")
    return recipe.model_copy(update={"deepspeed": deepspeed, "train": train}), note


def estimated_checkpoint_bytes(recipe: Recipe, *, gpus: bool) -> int | None:
    """Size of one checkpoint when checkpoints are on (from the model config on the meta device)."""
    if not (recipe.checkpoint.every_steps or recipe.checkpoint.every_minutes):
        return None
    from deepfleet.train.preflight import checkpoint_bytes

    shape = shape_for(recipe)
    precision_bytes = 2 if gpus and recipe.precision != "fp32" else 4
    return checkpoint_bytes(total_params=shape.total_params, trainable_params=shape.trainable_params,
                            precision_bytes=precision_bytes)


def recipe_paths(recipe: Recipe, workdir: str) -> tuple[str, ...]:
    """The model dir and data files the ranks read, as absolute paths (relative ones are relative to
    the ranks' working dir); only those this machine has: hub ids and builtins are not paths."""
    names = [recipe.model.name, *recipe.data.train, *recipe.data.validation.files]
    paths = [os.path.join(workdir, os.path.expanduser(n)) for n in names if not n.startswith(BUILTIN_MODEL_PREFIX)]
    return tuple(dict.fromkeys(os.path.normpath(p) for p in paths if os.path.exists(p)))


def check_same_inputs(fleet: Fleet, head: dict[str, dict], held: dict[str, dict[str, dict]] | None) -> None:
    """The model dir and data on every other host must be the head's, byte for byte (without shared
    storage, a host with stale data trains on it in silence)."""
    remote = {h.name for h in fleet.hosts if not h.local}
    problems = identity_problems(head, {h: s for h, s in (held or {}).items() if h in remote}, SYNC_FIX)
    if problems:
        raise DeepfleetError(problems=problems)


def sync_inputs(recipe: Recipe, fleet: Fleet) -> SyncReport | None:
    """`train --sync`: the recipe's model dir and data files to every host; None when nothing is to copy."""
    paths = recipe_paths(recipe, fleet.workdir or os.getcwd())
    return None if is_local_only(fleet) or not paths else run_sync(fleet, paths)


def prepare_training(recipe: Recipe, fleet: Fleet, *, nproc: int | None, facts_file: str | None = None
                     ) -> PreparedRun:
    """The run on `fleet` (this machine alone: `nproc` ranks, default one per GPU or 2 CPU ranks), planned
    from the hosts' own hardware and checked before launch; a DeepfleetError lists every problem found."""
    from deepfleet.train.preflight import check_before_launch

    checked = () if facts_file or is_local_only(fleet) else recipe_paths(recipe, fleet.workdir or os.getcwd())
    head = {path: summary for path in checked if (summary := path_summary(path)).get("digest")}
    found = fleet_hardware(fleet, nproc=nproc, facts_file=facts_file, checksum_paths=tuple(head),
                           probe_timeout=30 + sum(s["bytes"] for s in head.values()) / 50e6)
    check_same_inputs(found.fleet, head, found.held)
    check_fleet_hardware(found.fleet, found.hosts, precision=recipe.precision, method=recipe.method)
    shape = found.shape()
    recipe, note = resolve_auto_zero(recipe, shape)
    gpus = shape.accelerator == "cuda"
    check_before_launch(recipe, world_size=shape.world_size, accelerator=shape.accelerator,
                        bf16_supported=shape.bf16_supported, cuda_available=gpus,
                        bitsandbytes_installed=all(h.bitsandbytes for h in found.hosts),
                        checkpoint_size=estimated_checkpoint_bytes(recipe, gpus=gpus),
                        rank0_host=found.fleet.hosts[0].name, rank0_trackers=found.hosts[0].trackers)
    return PreparedRun(recipe=recipe, job=training_job(recipe, found), hardware=found, shape=shape, note=note)


def with_prepared_data(prepared: PreparedRun, write: Callable[[str], None] = print) -> TrainingJob:
    """The job, with the recipe's data prepared on this machine first (`deepfleet prepare`) for the
    ranks to map instead of each tokenizing it all, and sent to every host that does not see it."""
    from deepfleet.data_cache import prepare_recipe_data

    data = prepare_recipe_data(prepared.recipe, note=write)
    write(data.summary())
    send_prepared_data(prepared.job.fleet, str(data.path), write)
    return replace(prepared.job, prepared_data=str(data.path))


def send_prepared_data(fleet: Fleet, entry: str, write: Callable[[str], None]) -> None:
    """The entry at the same path on every ssh host (`deepfleet sync`: hosts on shared storage already
    hold it and get nothing). The ranks of a host it does not reach tokenize the data themselves.
    Nodes of a SLURM allocation get nothing: they share storage as a rule, and a job step cannot
    start the steps a copy between nodes would need."""
    hosts = tuple(h for h in fleet.hosts if not (h.local or h.via_srun))
    if not hosts:
        return
    report = run_sync(replace(fleet, hosts=hosts), [entry])
    sent = [o for o in report.outcomes if o.verdict == "verified"]
    if sent:
        write(f"data: sent the prepared data ({sum(o.bytes for o in sent) / 2**20:.1f} MiB) to "
              f"{', '.join(o.host for o in sent)} ({report.shape})")
    for failed in report.failed:
        write(f"warning: the prepared data did not reach {failed.host} ({failed.what}); its ranks tokenize "
              "the data themselves")


def training_job(recipe: Recipe, found: FleetHardware) -> TrainingJob:
    return TrainingJob(fleet=found.fleet, recipe_json=resolved_recipe_json(recipe), recipe_env=dict(recipe.env),
                       output_dir=recipe.output_path, cpu_threads=found.cpu_threads(), interface=found.interface)


def plan_report(recipe: Recipe, shape: FleetShape, found: FleetHardware, job: TrainingJob) -> "PlanReport":
    """The memory plan of `recipe` on the fleet found, its DeepSpeed config, and the job's commands."""
    resolved = resolve_run_config(recipe, world_size=shape.world_size, total_steps=planning_steps(recipe),
                                  accelerator=shape.accelerator, bf16_supported=shape.bf16_supported,
                                  model_shape=shape_for(recipe), fleet=shape, prebuilt_ops=found.prebuilt_ops)
    return PlanReport(recipe=recipe, resolved=resolved, commands=render_training_plan(job).splitlines(),
                      hardware=found, summary=run_summary(recipe, found, resolved))


def dry_run_report(prepared: PreparedRun) -> "PlanReport":
    """`deepfleet train --dry-run`: the plan of the resolved recipe on the fleet found, and its commands."""
    return plan_report(prepared.recipe, prepared.shape, prepared.hardware, prepared.job)


def run_summary(recipe: Recipe, found: FleetHardware, resolved: ResolvedDeepSpeedConfig) -> list[str]:
    from deepfleet.plan.render import optimizer_description

    config = resolved.config
    precision = "bf16" if config["bf16"].get("enabled") else "fp16" if config["fp16"].get("enabled") else "fp32"
    per_host = "+".join(str(r) for r in sorted({host.slots or 0 for host in found.fleet.hosts}, reverse=True))
    accelerator = resolved.plan.fleet.accelerator if resolved.plan else found.accelerator
    ranks = f"{found.world_size} ranks ({per_host} per host) on {accelerator}"
    backend = "NCCL" if accelerator == "cuda" else "gloo"
    lines = [f"hosts: {found.describe()}", f"ranks: {ranks}, {backend}, precision {precision}"]
    if (interface := found.interface) and interface.network:
        lines.append(f"network: {interface.network} via {', '.join(sorted(set(interface.per_host.values())))}"
                     + (f"; {interface.fabric.note}" if interface.fabric and accelerator == "cuda" else ""))
    link = resolved.plan.fleet.inter_host_gbps if resolved.plan else None
    if link and len(found.fleet.hosts) > 1:
        source = found.link_source if link == found.link_gbps else "--link-gbps"
        lines.append(f"link: {link:g} Gbit/s between hosts, from {source}")
    return lines + [f"model: {planned_attention(recipe, found)}", f"optimizer: {optimizer_description(config)}"]


def planned_attention(recipe: Recipe, found: FleetHardware) -> str:
    """The attention the ranks will choose (train/families.py), from the hosts' device and flash-attn."""
    from deepfleet.train.families import choose_attention
    from deepfleet.train.model_facts import model_facts

    family = model_facts(recipe).family
    choice = choose_attention(family, requested=recipe.model.attn_implementation, device_type=found.accelerator,
                              packed_rows=recipe.data.packing,
                              flash_available=found.accelerator == "cuda" and all(h.flash_attn for h in found.hosts))
    return f"{family.label}, attention {choice.describe()}"


GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory_size(text: str, option: str) -> int:
    """'80GiB', '80GB', '80G' (G = GiB, as GPU vendors mean it) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise DeepfleetError(f"cannot read memory size {text!r}", where=option, fix="write it like 80GiB or 24GB")
    return int(float(match.group(1)) * _UNITS[unit])


def planned_hardware(fleet_file: str | None, *, nodes: int | None, gpus_per_node: int | None,
                     facts_file: str | None, gpu_mem: str | None = None) -> tuple[FleetHardware, bool]:
    """The fleet to plan for and its hardware, and whether it is hypothetical: --nodes/--gpus-per-node
    describe hosts not named yet (node1..nodeN, like this machine); else the fleet deepfleet finds
    (--fleet, ./fleet.yaml, SLURM, PBS) with its hosts' own facts, or, given --gpu-mem and every
    host's slots, as the options say (no host is asked); else this machine."""
    if fleet_file and nodes:
        raise DeepfleetError("both --fleet and --nodes given", where="command line",
                             fix="plan for the fleet file, or for --nodes/--gpus-per-node, not both")
    if nodes or gpus_per_node:
        here = local_hardware("this machine")
        ranks = gpus_per_node or default_nproc(gpus=here.gpu_count)
        hosts = ((local_host(slots=ranks),) if (nodes or 1) == 1 else
                 tuple(Host(name=f"node{i}", address=f"node{i}", slots=ranks) for i in range(1, nodes + 1)))
        found = FleetHardware(fleet=Fleet(hosts=hosts, source="--nodes/--gpus-per-node"),
                              hosts=tuple(replace(here, name=h.name) for h in hosts), source="this machine")
        return found, not is_local_only(found.fleet)
    is_yaml = fleet_file is not None and fleet_file.lower().endswith((".yaml", ".yml"))
    fleet = resolve_fleet(fleet_file=fleet_file if is_yaml else None, hostfile=None if is_yaml else fleet_file)
    if gpu_mem and not facts_file and all(h.slots is not None for h in fleet.hosts):
        hosts = tuple(HostHardware(name=h.name, gpu_count=h.slots or 0) for h in fleet.hosts)
        return FleetHardware(fleet=fleet, hosts=hosts, source="--gpu-mem"), True
    return fleet_hardware(fleet, facts_file=facts_file), False


def fleet_shape(found: FleetHardware, *, hypothetical: bool, gpu_mem: str | None = None, host_mem: str | None = None,
                link_gbps: float | None = None, bf16: bool | None = None) -> FleetShape:
    """The planner's view of the fleet: what the options say first, else the hardware found."""
    known_models = all(h.gpu_models for h in found.hosts)   # bf16 is known too
    if gpu_mem:
        shape = FleetShape(**found.rank_layout(), accelerator="cuda", device_memory_bytes=parse_memory_size(gpu_mem, "--gpu-mem"),
                           host_memory_bytes=None,
                           bf16_supported=all(h.bf16 for h in found.hosts) if known_models else True)
    elif hypothetical and found.accelerator == "cpu":
        raise DeepfleetError("no GPU here to measure, and the fleet's GPU memory is unknown", where="--gpu-mem",
                             fix="pass --gpu-mem (e.g. --gpu-mem 80GiB) and --host-mem for the fleet's hosts")
    else:
        shape = found.shape()
        if hypothetical:   # hosts not named yet: their memory is not this machine's
            shape = replace(shape, host_memory_bytes=None)
    return replace(shape, host_memory_bytes=parse_memory_size(host_mem, "--host-mem") if host_mem
                   else shape.host_memory_bytes,
                   bf16_supported=shape.bf16_supported if bf16 is None else bf16,
                   inter_host_gbps=link_gbps or shape.inter_host_gbps)


@dataclass(frozen=True)
class PlanReport:
    recipe: Recipe
    resolved: ResolvedDeepSpeedConfig   # .plan (memory rows, choice), .config (the DeepSpeed JSON)
    commands: list[str]                 # what `deepfleet train` would run on each host
    hardware: FleetHardware             # the hosts planned for, and where their facts came from
    summary: list[str]                  # hosts, ranks, precision and backend, attention, optimizer

    @property
    def deepspeed_config(self) -> dict:
        return self.resolved.config

    def table(self) -> str:
        """The report `deepfleet plan` prints: memory table, choice, DeepSpeed config, commands."""
        import io

        from rich.console import Console

        from deepfleet.plan.render import render_plan

        out = io.StringIO()
        render_plan(Console(file=out, width=140, highlight=False), self.recipe, self.resolved, self.commands,
                    self.summary)
        return out.getvalue()


def build_plan(recipe: Recipe, fleet_file: str | None = None, *, nodes: int | None = None,
               gpus_per_node: int | None = None, gpu_mem: str | None = None, host_mem: str | None = None,
               link_gbps: float | None = None, bf16: bool | None = None, facts_file: str | None = None) -> PlanReport:
    """Memory per ZeRO stage and offload, the chosen setting, its DeepSpeed config and the commands, for
    `fleet_file` (None: the fleet deepfleet finds; its hosts' facts asked over ssh, or read from
    `facts_file`) or for `nodes` x `gpus_per_node`."""
    found, hypothetical = planned_hardware(fleet_file, nodes=nodes, gpus_per_node=gpus_per_node,
                                           facts_file=facts_file, gpu_mem=gpu_mem)
    if not hypothetical:
        check_fleet_hardware(found.fleet, found.hosts, precision=recipe.precision, method=recipe.method)
    shape = fleet_shape(found, hypothetical=hypothetical, gpu_mem=gpu_mem, host_mem=host_mem, link_gbps=link_gbps,
                        bf16=bf16)
    return plan_report(recipe, shape, found, training_job(recipe, found))
