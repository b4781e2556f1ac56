"""The GPU smoke test's runs through the `deepfleet` CLI (train, export, generate) and their checks.

Every check returns its figures as text, or raises `CheckFailed` with them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.builtin import TINY_MODEL_NAME, builtin_model_config, builtin_task_records
from deepfleet.train.families import FAMILIES, choose_attention
from deepfleet.train.generate import chat_prompt, generate_answers, load_for_generation
from deepfleet.train.metrics import METRICS_FILE, read_metrics
from deepfleet.train.model import flash_attention_available
from deepfleet.train.tokenizer import load_tokenizer

from gpu_smoke_target import CheckFailed, MfuModelSize, Target

TRAIN_RECORDS = 2000            # epochs repeat when a run needs more rows
TINY_STEPS = 30
TINY_MICRO_BATCH = 8
LOSS_WINDOW = 3                 # loss falls: mean of the last steps below this share of the first steps' mean
LOSS_FALL = 0.85
MFU_WARMUP_STEPS = 3
MFU_BOUNDS = (0.01, 1.0)
PROMPT = "upper hello"
TRAIN_TIMEOUT, CLI_TIMEOUT = 150.0, 90.0


@dataclass(frozen=True, kw_only=True)
class Workspace:
    """Where each check reads and writes, under one temp root."""
    root: Path
    data: Path
    tiny_run: Path
    final: Path
    exported: Path
    mfu_model: Path
    mfu_run: Path

    @classmethod
    def under(cls, root: Path) -> "Workspace":
        return cls(root=root, data=root / "train.jsonl", tiny_run=root / "tiny-run", final=root / "tiny-run" / "final",
                   exported=root / "exported", mfu_model=root / "mfu-model", mfu_run=root / "mfu-run")


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    log: Path

    def last_error_line(self) -> str:
        lines = [line for line in (self.stderr + "\n" + self.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or ["no output"])[-1].strip()


def run_deepfleet(args: list[str], *, log: Path, timeout: float) -> CommandResult:
    """`deepfleet ARGS` with this Python; stdout and stderr kept in LOG.out / LOG.err."""
    command = [sys.executable, "-m", "deepfleet.cli.app", *args]
    started = time.perf_counter()
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=log.parent, env=local_only_environment())
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            raise CheckFailed(f"`deepfleet {args[0]}` did not finish in {timeout:.0f} s (logs: {log}.out/.err)")
        except BaseException:   # the smoke script itself is stopped: take the run down with it
            stop(process)
            raise
    return CommandResult(returncode=returncode, seconds=time.perf_counter() - started, log=log,
                         stdout=log.with_suffix(".out").read_text(), stderr=log.with_suffix(".err").read_text())


def local_only_environment() -> dict[str, str]:
    """This environment without the batch-system variables that would make `deepfleet train` launch on
    every host of a SLURM/PBS allocation: the smoke test is about this machine's GPUs."""
    return {name: value for name, value in os.environ.items() if name not in ("SLURM_JOB_NODELIST", "PBS_NODEFILE")}


def stop(process: subprocess.Popen) -> None:
    """SIGTERM first: `deepfleet train` then stops its ranks on every host itself."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)   # within the 30 s `timeout --kill-after` in gpu_smoke.sh allows
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def require_success(result: CommandResult, what: str) -> None:
    if result.returncode != 0:
        raise CheckFailed(f"{what} exited {result.returncode} after {result.seconds:.0f} s: "
                          f"{result.last_error_line()} (logs: {result.log}.out/.err)")


def write_training_data(path: Path) -> None:
    records = builtin_task_records(TRAIN_RECORDS, seed=7, split="train")
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def recipe_for(target: Target, *, model: str, data: Path, output_dir: Path, max_length: int, micro_batch: int,
               steps: int, lr: float, checkpoint_every: int) -> dict:
    return {"model": model, "method": "full",
            "data": {"train": [str(data)], "max_length": max_length, "packing": True},
            "train": {"max_steps": steps, "global_batch": micro_batch * target.ranks, "micro_batch": micro_batch,
                      "lr": lr, "warmup": 2},
            "precision": target.precision, "deepspeed": {"zero": 2},
            "checkpoint": {"every_steps": checkpoint_every},
            "logging": {"every_steps": 1, "tensorboard": False},
            "output_dir": str(output_dir)}


def train(recipe: dict, target: Target, *, name: str, workspace: Workspace) -> CommandResult:
    recipe_path = workspace.root / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_deepfleet(["train", str(recipe_path), "--nproc", str(target.ranks)],
                         log=workspace.root / name, timeout=TRAIN_TIMEOUT)


def train_records(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir / METRICS_FILE) if record.get("kind") == "train"]


# -- 1. bf16 training of the tiny model -------------------------------------------------------------

def check_tiny_training(target: Target, workspace: Workspace) -> str:
    recipe = recipe_for(target, model=TINY_MODEL_NAME, data=workspace.data, output_dir=workspace.tiny_run,
                        max_length=128, micro_batch=TINY_MICRO_BATCH, steps=TINY_STEPS, lr=3e-3,
                        checkpoint_every=TINY_STEPS)   # a checkpoint at the end, for export
    result = train(recipe, target, name="tiny-train", workspace=workspace)
    require_success(result, "deepfleet train")
    return f"{TINY_MODEL_NAME} {target.precision} on {target.ranks} rank(s), {TINY_STEPS} steps, exit 0 in " \
           f"{result.seconds:.0f} s"


def check_loss_falls(workspace: Workspace) -> str:
    losses = [record["loss"] for record in train_records(workspace.tiny_run)]
    if len(losses) < 2 * LOSS_WINDOW:
        raise CheckFailed(f"only {len(losses)} train records in {workspace.tiny_run / METRICS_FILE}")
    first, last = statistics.mean(losses[:LOSS_WINDOW]), statistics.mean(losses[-LOSS_WINDOW:])
    figures = f"{first:.3f} -> {last:.3f} (mean of the first and last {LOSS_WINDOW} of {len(losses)} steps)"
    if not last < LOSS_FALL * first:
        raise CheckFailed(f"{figures}: not below {LOSS_FALL:.0%} of the start")
    return figures


def expected_attention(target: Target) -> str:
    return choose_attention(FAMILIES["llama"], requested="auto", device_type=target.device_type, packed_rows=True,
                            flash_available=flash_attention_available(target.device_type)).describe()


def recorded_precisions(run_dir: Path) -> dict[str, str]:
    """The precision as each file of the run records it (train records in metrics.jsonl carry none)."""
    recorded = {}
    for ds_config in sorted(run_dir.glob("checkpoints/step-*/ds_config.json")):
        config = json.loads(ds_config.read_text())
        enabled = [name for name in ("bf16", "fp16") if config.get(name, {}).get("enabled")]
        recorded[str(ds_config.relative_to(run_dir))] = enabled[0] if enabled else "fp32"
    model_config = json.loads((run_dir / "final" / "config.json").read_text())
    dtype = model_config.get("dtype") or model_config.get("torch_dtype")
    recorded["final/config.json"] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    return recorded


def recorded_attentions(run_dir: Path) -> dict[str, str]:
    """The attention each rank-0 startup line in the run's host logs names."""
    found = {}
    for log in sorted(run_dir.glob("logs/attempt-*/*.log")):
        for match in re.finditer(r"\| [^|\n]*attention ([^|\n]+?) \|", log.read_text()):
            found[str(log.relative_to(run_dir))] = match.group(1)
    return found


def check_recorded_setup(target: Target, workspace: Workspace) -> str:
    attention = expected_attention(target)
    precisions, attentions = recorded_precisions(workspace.tiny_run), recorded_attentions(workspace.tiny_run)
    wrong = [f"{where}: {value}" for where, value in precisions.items() if value != target.precision]
    wrong += [f"{where}: attention {value}" for where, value in attentions.items() if value != attention]
    if not attentions:
        wrong.append("no startup line naming the attention in logs/attempt-*/")
    figures = (f"precision {target.precision} in {', '.join(precisions)}; attention {attention} in "
               f"{', '.join(attentions)}")
    if wrong:
        raise CheckFailed(f"expected precision {target.precision}, attention {attention}; found {'; '.join(wrong)}")
    return figures


# -- 3. MFU on a model big enough for it to mean something -------------------------------------------

def write_mfu_model(directory: Path, size: MfuModelSize) -> int:
    """A random-weight Llama of `size` with the built-in tokenizer, as save_pretrained writes it; its parameters."""
    tokenizer = load_tokenizer(ModelSpec(name=TINY_MODEL_NAME))
    config = builtin_model_config(tokenizer)
    config.update({"hidden_size": size.hidden, "intermediate_size": size.intermediate,
                   "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
                   "num_key_value_heads": size.heads, "head_dim": size.hidden // size.heads})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model.num_parameters()


def check_mfu(target: Target, workspace: Workspace) -> str:
    size = target.mfu_model
    n_params = write_mfu_model(workspace.mfu_model, size)
    recipe = recipe_for(target, model=str(workspace.mfu_model), data=workspace.data, output_dir=workspace.mfu_run,
                        max_length=size.max_length, micro_batch=size.micro_batch, steps=size.steps, lr=3e-4,
                        checkpoint_every=0)
    result = train(recipe, target, name="mfu-train", workspace=workspace)
    require_success(result, "deepfleet train (MFU model)")
    measured = [record for record in train_records(workspace.mfu_run) if record["step"] > MFU_WARMUP_STEPS]
    if not measured:
        raise CheckFailed(f"no train records after step {MFU_WARMUP_STEPS} in {workspace.mfu_run / METRICS_FILE}")
    low, high = min(r["mfu"] for r in measured), max(r["mfu"] for r in measured)
    figures = (f"{low:.1%}..{high:.1%} over steps {measured[0]['step']}-{measured[-1]['step']} "
               f"({n_params / 1e6:.1f}M params, {target.precision}, {target.ranks} rank(s), "
               f"{size.micro_batch} x {size.max_length} tokens per rank-step)")
    if low < MFU_BOUNDS[0] or high > MFU_BOUNDS[1]:
        raise CheckFailed(f"{figures}: outside {MFU_BOUNDS[0]:.0%}..{MFU_BOUNDS[1]:.0%}")
    return figures


# -- 4. generate on the device ---------------------------------------------------------------------------

def check_generation_placement(target: Target, workspace: Workspace) -> str:
    model, tokenizer = load_for_generation(workspace.final)
    parameter = next(model.parameters())
    answer = generate_answers(model, tokenizer, [[{"role": "user", "content": PROMPT}]], max_new_tokens=16)[0]
    expected = f"{target.device_type} in {dtype_name(target.dtype)}"
    figures = f"model on {parameter.device} in {dtype_name(parameter.dtype)} (expected {expected}), answer {answer!r}"
    if parameter.device.type != target.device_type or parameter.dtype != target.dtype:
        raise CheckFailed(figures)
    return figures


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_generate_cli(workspace: Workspace) -> str:
    result = run_deepfleet(["generate", str(workspace.final), PROMPT, "--max-new-tokens", "16"],
                           log=workspace.root / "generate", timeout=CLI_TIMEOUT)
    require_success(result, "deepfleet generate")
    answer = result.stdout.strip()
    if not answer:
        raise CheckFailed(f"exit 0 but no answer printed (logs: {result.log}.out/.err)")
    return f"{PROMPT!r} -> {answer!r} in {result.seconds:.0f} s"


# -- 5. export ---------------------------------------------------------------------------------------------

def prompt_logits(model_dir: Path) -> torch.Tensor:
    """Logits on the chat prompt of PROMPT, with the model where and in the dtype `generate` puts it."""
    model, tokenizer = load_for_generation(model_dir)
    encoded = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": PROMPT}]), return_tensors="pt",
                        add_special_tokens=False)
    with torch.no_grad():
        return model(**{key: value.to(model.device) for key, value in encoded.items()}).logits.float().cpu()


def check_export(target: Target, workspace: Workspace) -> str:
    result = run_deepfleet(["export", str(workspace.tiny_run), "--to", str(workspace.exported)],
                           log=workspace.root / "export", timeout=CLI_TIMEOUT)
    require_success(result, "deepfleet export")
    exported, final = prompt_logits(workspace.exported), prompt_logits(workspace.final)
    difference = (exported - final).abs().max().item()
    scale = max(final.abs().max().item(), 1.0)
    source = json.loads((workspace.exported / "deepfleet.json").read_text()).get("exported_from", "?")
    figures = (f"{Path(source).name} -> HF dir that loads; logits max diff {difference:.3g} vs final "
               f"(max |logit| {scale:.3g}, tolerance {target.export_tolerance:.0e} of it)")
    if difference > target.export_tolerance * scale:
        raise CheckFailed(figures)
    return figures
