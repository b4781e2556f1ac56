"""The training program inside each rank: data -> model -> DeepSpeed engine loop -> metrics -> save.

An explicit loop around `deepspeed.initialize` (not HF Trainer), so gloo/CPU and NCCL/GPU run the
same code. The optimizer and scheduler live in the DeepSpeed config from `plan/`. Everything a
resume needs follows from `TrainState.step` (see `data_order.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from deepfleet.contract import PREPARED_DATA_ENV
from deepfleet.plan.deepspeed_config import deepspeed_config_for_run, resolve_precision, solve_batch_layout
from deepfleet.plan.recipe import Recipe
from deepfleet.train.compiled_model import CompiledModel, choose_compile, compile_engine, fallback_warning
from deepfleet.train.console import TrainingConsole
from deepfleet.train.data_order import DataOrder, MicroBatch, validation_batches
from deepfleet.train.dataset import IGNORE_INDEX, DatasetReport
from deepfleet.train.prepared_data import rank_datasets
from deepfleet.train.distributed import (Device, RankEnv, barrier, gather_across_ranks, init_distributed,
                                         objects_across_ranks, ops_prebuilt_on_every_rank, seed_rank, synchronize)
from deepfleet.train.metrics import (LOSS_PLOT_FILE, Heartbeat, MetricsWriter, StepMetrics, mfu, mfu_above_one_warning,
                                     plot_loss)
from deepfleet.train.loss_head import LossOutput, model_loss
from deepfleet.train.model import BuiltModel, build_model, torch_dtype_for
from deepfleet.train.packed_attention import model_inputs
from deepfleet.train.peak import RankPeak, choose_peak, device_name, peak_summary, rank_peak
from deepfleet.train.save import save_final_model
from deepfleet.train.tokenizer import load_tokenizer
from deepfleet.train.tracker_set import open_trackers
from deepfleet.train.builtin import TINY_MODEL_NAME
from deepfleet.train.checkpoint import (common_resume_step, load_checkpoint, output_dir_shared_by_all_ranks,
                                        save_checkpoint)
from deepfleet.train.checkpoint_layout import (SavePolicy, check_resumable, checkpoints_root, complete_checkpoints,
                                               remove_incomplete, run_fingerprint, step_dir)
from deepfleet.train.preemption import Preempted, StopRequest
from deepfleet.train.startup_marks import StartupMarks


@dataclass(kw_only=True)
class TrainState:
    step: int = 0              # optimizer steps done; the data position is derived from it
    epoch: int = 0
    tokens_seen: int = 0       # real tokens, all ranks


@dataclass(kw_only=True)
class TrainingRun:
    recipe: Recipe
    rank_env: RankEnv
    device: Device
    tokenizer: Any
    report: DatasetReport
    order: DataOrder
    validation: DataOrder | None
    total_steps: int
    ds_config: dict
    built: BuiltModel
    engine: Any
    compiled: CompiledModel    # engine.compile() or eager, and the recompiles
    precision: str
    peak: RankPeak             # this rank's peak FLOP/s and where it came from
    rank_peak_flops: list[float]   # every rank's peak, in rank order: MFU divides by their sum

    @property
    def peak_summary(self) -> str:
        return peak_summary(self.peak, self.rank_peak_flops)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    val_loss: float | None
    seconds: float
    final_dir: Path | None


def build_training_run(recipe: Recipe, rank_env: RankEnv, startup: StartupMarks | None = None) -> TrainingRun:
    import deepspeed

    startup = startup or StartupMarks()
    startup.end("imports")
    device = init_distributed(rank_env)
    startup.end("rendezvous")
    tokenizer = load_tokenizer(recipe.model)
    train_set, validation_set, report = rank_datasets(recipe, tokenizer, os.environ.get(PREPARED_DATA_ENV))
    precision = resolve_precision(recipe.precision, accelerator=device.accelerator,
                                  bf16_supported=device.bf16_supported)
    layout = solve_batch_layout(global_batch=recipe.train.global_batch, micro_batch=recipe.train.micro_batch,
                                world_size=rank_env.world_size)
    common = dict(max_length=recipe.data.max_length, packing=recipe.data.packing, seed=recipe.train.seed,
                  rank=rank_env.rank, world_size=rank_env.world_size, micro_batch=layout.micro_batch,
                  pad_id=tokenizer.pad_token_id)
    order = DataOrder(examples=train_set, grad_accum=layout.grad_accum, **common)
    order.check_enough_rows()
    validation = DataOrder(examples=validation_set, grad_accum=1, **common) if validation_set else None
    total_steps = order.total_steps(epochs=recipe.train.epochs, max_steps=recipe.train.max_steps)
    ds_config = deepspeed_config_for_run(recipe, world_size=rank_env.world_size, total_steps=total_steps,
                                         accelerator=device.accelerator, bf16_supported=device.bf16_supported,
                                         prebuilt_ops=ops_prebuilt_on_every_rank())
    if not output_dir_shared_by_all_ranks(recipe.output_path, rank=rank_env.rank, local_rank=rank_env.local_rank,
                                          device=device.device):
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "use_node_local_storage": True}}
    # The planner (deepspeed: auto) or a user JSON may choose another micro batch for the same global batch.
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    order = replace(order, micro_batch=micro, grad_accum=accum)
    validation = replace(validation, micro_batch=micro) if validation else None
    startup.end("data")
    built = build_model(recipe, tokenizer, ds_config=ds_config, precision=precision, device=device.device,
                        for_training=True)
    startup.end("model")
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=built.model, model_parameters=trainable, config=ds_config)
    start_warmup_at_its_first_step(engine.lr_scheduler)
    choice = choose_compile(recipe.train.compile, device_type=device.device.type, total_steps=total_steps,
                            zero_stage=ds_config["zero_optimization"]["stage"], method=recipe.method,
                            hidden_size=built.model.config.get_text_config().hidden_size)
    compiled = compile_engine(engine, choice, requested=recipe.train.compile)
    startup.end("deepspeed_init")
    seed_rank(recipe.train.seed, rank_env.rank)
    peak = rank_peak(choose_peak(recipe_peak_tflops=recipe.logging.peak_tflops, device_type=device.device.type,
                                 device_name=device_name(device.device), precision=precision), device.device)
    rank_peak_flops = [values[0] for values in gather_across_ranks([peak.flops], device.device)]
    return TrainingRun(recipe=recipe, rank_env=rank_env, device=device, tokenizer=tokenizer, report=report,
                       order=order, validation=validation, total_steps=total_steps, ds_config=ds_config,
                       built=built, engine=engine, compiled=compiled, precision=precision, peak=peak,
                       rank_peak_flops=rank_peak_flops)


def start_warmup_at_its_first_step(scheduler) -> None:
    """DeepSpeed's warmup schedulers give the first optimizer step the lr of iteration -1 and the second
    that of iteration 0, which is the same: the warmup's start twice (lr 0 for two steps, or for one with
    no warmup). Stepped to iteration 0 before training, step k gets iteration k's lr, as in transformers'
    schedules. A resumed run then loads the checkpoint's iteration over it."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupLR   # WarmupDecayLR is a WarmupLR
    if isinstance(scheduler, (WarmupLR, WarmupCosineLR)) and scheduler.last_batch_iteration == -1:
        scheduler.step(0)


def _forward(run: TrainingRun, batch: MicroBatch, *, training: bool) -> LossOutput:
    """The engine's loss for one micro batch, in the form the model's attention needs, plain or chunked.

    MoE models add their router load-balancing loss (with the model's own coefficient) in training."""
    tensors = {key: value.to(run.device.device, non_blocking=True) for key, value in batch.tensors.items()}
    attention = run.built.attention
    tensors = model_inputs(tensors, block_mask=attention.block_mask, flatten_rows=attention.flatten_rows,
                           mask_dtype=torch_dtype_for(run.precision))
    extra = {"output_router_logits": training} if run.built.family.is_moe else {}
    return run.compiled.run(lambda: model_loss(run.engine, run.engine.module, run.built.loss, tensors,
                                               use_cache=False, **extra))


def _local_grad_norm(engine) -> float:
    """Stage 0 in fp32 clips with torch and never records the norm; compute it from the reduced grads."""
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def train_one_step(run: TrainingRun, state: TrainState, *, stop_requested: bool = False) -> tuple[StepMetrics, bool]:
    """One optimizer step: grad_accum forward/backward micro batches, then engine.step().

    Also returns whether any rank was asked to stop (shared through the metrics all-reduce).
    """
    engine, device = run.engine, run.device.device
    engine.train()
    synchronize(device)
    started = time.perf_counter()
    lr = engine.get_lr()[0]
    loss_sum, aux_sum, real_tokens, model_flops = 0.0, 0.0, 0, 0.0
    norm_before_step = None
    for batch in run.order.micro_batches(state.step):
        output = _forward(run, batch, training=True)
        engine.backward(output.loss)
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0 \
                and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
            norm_before_step = _local_grad_norm(engine)
        engine.step()
        loss_sum += output.loss.detach().float().item()
        if run.built.family.is_moe:
            aux_sum += float(output.aux_loss)
        real_tokens += batch.real_tokens
        model_flops += run.built.flops.of_sequences(batch.sequence_lengths)
    synchronize(device)
    seconds = time.perf_counter() - started
    grad_norm = engine.get_global_grad_norm()
    grad_norm = norm_before_step if grad_norm is None else float(grad_norm)
    world = run.rank_env.world_size
    accum = run.order.grad_accum
    recompiles = run.compiled.recompiles
    per_rank = gather_across_ranks([loss_sum / accum, float(real_tokens), float(stop_requested), aux_sum / accum,
                                    model_flops, seconds, float(recompiles or 0), float(bool(run.compiled.fallback))],
                                   device)
    _report_new_fallbacks(run, [bool(values[7]) for values in per_rank])
    loss_total, tokens, stop_votes, aux_total, flops = (sum(values[i] for values in per_rank) for i in range(5))
    rank_seconds = [values[5] for values in per_rank]
    step_seconds = max(rank_seconds)
    tokens_per_second = tokens / max(step_seconds, 1e-9)
    state.tokens_seen += int(tokens)
    state.step += 1
    state.epoch = run.order.locate(state.step)[0]
    metrics = StepMetrics(step=state.step, epoch=state.epoch, loss=loss_total / world, lr=lr,
                       grad_norm=float("nan") if grad_norm is None else grad_norm, tokens=int(tokens),
                       step_seconds=step_seconds, tokens_per_second=tokens_per_second, model_flops=flops,
                       mfu=mfu(model_flops=flops, seconds=step_seconds, peak_flops=sum(run.rank_peak_flops)),
                       rank_step_seconds=rank_seconds,
                       router_aux_loss=aux_total / world if run.built.family.is_moe else None,
                       recompiles=None if recompiles is None else int(max(values[6] for values in per_rank)))
    return metrics, stop_votes > 0


@torch.no_grad()
def validation_loss(run: TrainingRun) -> float | None:
    """Token-weighted mean loss over the validation set, all ranks."""
    if run.validation is None:
        return None
    engine = run.engine
    engine.eval()
    weighted, count = 0.0, 0.0
    for batch in validation_batches(run.validation):
        n_targets = float((batch.tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
        output = _forward(run, batch, training=False)
        weighted += output.loss.float().item() * n_targets
        count += n_targets
    engine.train()
    per_rank = gather_across_ranks([weighted, count, float(bool(run.compiled.fallback))], run.device.device)
    _report_new_fallbacks(run, [bool(values[2]) for values in per_rank])    # the final validation has no step after it
    weighted, count = (sum(values[i] for values in per_rank) for i in range(2))
    return weighted / count if count else None


def _report_new_fallbacks(run: TrainingRun, fell_back: list[bool]) -> None:
    """One warning line from rank 0 for the ranks whose compiling failed since the last report. `fell_back` is
    every rank's flag, the same on every rank, so either all ranks gather the causes or none does."""
    new_ranks = run.compiled.newly_fallen_back(fell_back)
    if new_ranks:
        causes = objects_across_ranks(run.compiled.fallback)
        if run.rank_env.is_main:
            print(fallback_warning(causes, new_ranks), file=sys.stderr, flush=True)


def run_training(recipe: Recipe, rank_env: RankEnv, *, console_stream: IO[str] | None = None,
                 startup: StartupMarks | None = None) -> TrainResult:
    started = time.perf_counter()
    # Step -1 tells the supervisor this rank is still starting (loading, rendezvous): its longer timeout applies.
    Heartbeat(rank_env.heartbeat_dir, rank_env.rank, recipe.logging.heartbeat_seconds).busy()
    startup = startup or StartupMarks()
    run = build_training_run(recipe, rank_env, startup)
    return train_and_save(run, console_stream=console_stream, started=started, startup=startup)


def train_and_save(run: TrainingRun, *, console_stream: IO[str] | None = None,
                   started: float | None = None, startup: StartupMarks | None = None) -> TrainResult:
    """Train from the newest complete checkpoint (or step 0) to total_steps, validate, save output_dir/final.

    Every rank calls this. Raises `Preempted` after checkpointing when a stop signal arrived. Rank 0
    prints its startup timings (`startup`) after its first step.
    """
    started = time.perf_counter() if started is None else started
    recipe, rank_env = run.recipe, run.rank_env
    output_dir = recipe.output_path
    console = TrainingConsole(console_stream, total_steps=run.total_steps, every_steps=recipe.logging.every_steps,
                              enabled=rank_env.is_main, rank_hosts=objects_across_ranks(socket.gethostname()))
    console.say(_startup_line(run))
    state = resume_or_start(run, console)
    writer = None
    if rank_env.is_main:
        run_info = {"peak": run.peak_summary, "peak_flops_per_rank": run.rank_peak_flops}
        trackers = open_trackers(recipe, ds_config=run.ds_config, run_info=run_info, resume_after_step=state.step)
        writer = MetricsWriter(output_dir, trackers=trackers, resume_after_step=state.step, run_info=run_info)
    heartbeat = Heartbeat(rank_env.heartbeat_dir, rank_env.rank, recipe.logging.heartbeat_seconds)
    heartbeat.beat(state.step, force=True)
    policy = SavePolicy(every_steps=recipe.checkpoint.every_steps, every_minutes=recipe.checkpoint.every_minutes,
                        keep=recipe.checkpoint.keep)
    stop = StopRequest(recipe.checkpoint.preempt_signal)
    first_loss = last_loss = math.nan
    mfu_warning = None
    val_every = recipe.data.validation.every_steps
    seconds_since_save = 0.0   # sum of all-reduced step times: the same on every rank, so saves agree
    console.start(state.step)
    if startup:
        startup.end("setup")
    try:
        while state.step < run.total_steps:
            metrics, stop_now = train_one_step(run, state, stop_requested=stop.requested)
            heartbeat.beat(state.step)
            if startup and "first_step" not in startup.phases:
                startup.end("first_step")
                if rank_env.is_main:
                    print(startup.line(), file=sys.stderr, flush=True)
            first_loss = metrics.loss if math.isnan(first_loss) else first_loss
            last_loss = metrics.loss
            seconds_since_save += metrics.step_seconds
            if writer and (state.step % recipe.logging.every_steps == 0 or state.step == run.total_steps):
                writer.write_step(metrics)
            console.step(metrics)
            if mfu_warning is None and (mfu_warning := mfu_above_one_warning(metrics.mfu, run.peak_summary)):
                console.say(mfu_warning)
            if stop_now:
                heartbeat.busy()
                path = _save_checkpoint(run, state)
                if writer:
                    writer.close()
                raise Preempted(state.step, path)
            if val_every and state.step % val_every == 0 and state.step < run.total_steps:
                heartbeat.busy()
                _log_validation(run, state, writer, console)
            if policy.due(step=state.step, seconds_since_save=seconds_since_save):
                heartbeat.busy()
                _save_checkpoint(run, state)
                seconds_since_save = 0.0
    finally:
        console.stop()
        stop.restore()
    heartbeat.busy()
    val_loss = _log_validation(run, state, writer, console)
    final = save_final_model(run.engine, run.tokenizer, output_dir, rank=rank_env.rank,
                             is_lora=recipe.method != "full", base_model_name=recipe.model.name,
                             save_base_weights=recipe.model.name == TINY_MODEL_NAME,
                             run_info={"steps": state.step, "world_size": rank_env.world_size})
    if writer is not None:
        writer.close(final_dir=final)
        plot_loss(writer.path, output_dir / LOSS_PLOT_FILE)
        console.say(f"saved {final} ({'LoRA adapter' if recipe.method != 'full' else 'HF model'}), "
                    f"metrics in {writer.path}, plot in {output_dir / LOSS_PLOT_FILE}")
    return TrainResult(steps=state.step, first_loss=first_loss, last_loss=last_loss, val_loss=val_loss,
                       seconds=time.perf_counter() - started, final_dir=final)


def resume_or_start(run: TrainingRun, console: TrainingConsole) -> TrainState:
    """The newest complete checkpoint every rank has (engine, optimizer, scheduler, RNG, step), or step 0."""
    recipe, rank_env = run.recipe, run.rank_env
    output_dir = recipe.output_path
    if rank_env.local_rank == 0:
        for path in remove_incomplete(output_dir):
            console.say(f"removed incomplete checkpoint {path}")
        if not recipe.resume and complete_checkpoints(output_dir):
            aside = output_dir / f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}"
            with contextlib.suppress(FileNotFoundError):   # shared storage: another host moved it first
                checkpoints_root(output_dir).rename(aside)
                console.say(f"resume is off: starting over; previous checkpoints moved to {aside}")
    barrier()
    if not recipe.resume:
        return TrainState()
    mine = (socket.gethostname(), [step for step, _ in complete_checkpoints(output_dir)])
    step = common_resume_step(objects_across_ranks(mine), output_dir)
    if step < 0:
        return TrainState()
    path = step_dir(output_dir, step)
    check_resumable(path, run_fingerprint(recipe, world_size=rank_env.world_size))
    state = TrainState(**load_checkpoint(run.engine, path, rank=rank_env.rank))
    console.say(f"resuming from {path} (step {state.step} of {run.total_steps})")
    return state


def _save_checkpoint(run: TrainingRun, state: TrainState) -> Path:
    rank_env = run.rank_env
    recipe_json = run.recipe.model_dump_json(indent=2, exclude={"env"})
    return save_checkpoint(run.engine, state, run.recipe.output_path, rank=rank_env.rank,
                           local_rank=rank_env.local_rank, keep=run.recipe.checkpoint.keep,
                           fingerprint=run_fingerprint(run.recipe, world_size=rank_env.world_size),
                           recipe_json=recipe_json, ds_config=run.ds_config)


def _log_validation(run: TrainingRun, state: TrainState, writer: MetricsWriter | None,
                    console: TrainingConsole) -> float | None:
    loss = validation_loss(run)
    if loss is not None:
        if writer:
            writer.write_validation(step=state.step, val_loss=loss)
        console.say(f"validation loss {loss:.4f} at step {state.step}")
    return loss


def _startup_line(run: TrainingRun) -> str:
    recipe, report, built = run.recipe, run.report, run.built
    stage = run.ds_config["zero_optimization"]["stage"]
    model = (f"{built.family.label}, attention {built.attention.describe()}, loss {built.loss.describe()}, "
             f"{run.compiled.describe()}")
    if built.family.is_moe:
        model += f", router aux loss x {built.model.config.router_aux_loss_coef:g}"
    return (f"{recipe.model.name} {recipe.method} | ZeRO-{stage} | {run.rank_env.world_size} ranks on "
            f"{run.device.accelerator} | {model} | {built.n_params:,} params ({built.n_trainable:,} trainable) | "
            f"{report.n_train} train / {report.n_validation} validation examples ({report.format}) | "
            f"{run.total_steps} steps of {recipe.train.global_batch} rows | MFU peak: {run.peak_summary}"
            + (f" | warning: {report.n_truncated} sequences truncated to data.max_length {report.max_length}"
               if report.n_truncated else ""))
