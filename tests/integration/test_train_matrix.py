"""2-rank CPU training with real torchrun + DeepSpeed: ZeRO 0/2/3 x full/LoRA reduce the loss, save
an HF dir that reloads to the trained engine's logits, write metrics, and generate."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepfleet.train.export import export_checkpoint
from deepfleet.train.generate import generate_answers, load_for_generation
from deepfleet.train.metrics import read_metrics

from training_fixtures import DEEPFLEET, PYTHON, REPO, write_recipe, write_task_data

pytestmark = pytest.mark.integration

COMBOS = [(0, "full"), (0, "lora"), (2, "full"), (2, "lora"), (3, "full"), (3, "lora")]  # ZeRO-3 last: global config
LR = {"full": 3e-3, "lora": 1e-2}
MEASURED_PEAK = (2, "full")   # no logging.peak_tflops: each rank measures its fp32 matmul peak
STEPS = 10
PROBE = [[5, 17, 23, 42, 8, 9, 61, 3, 30, 12]]


def combo_dir(root: Path, stage: int, method: str) -> Path:
    return root / f"zero{stage}-{method}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    train, validation = write_task_data(root / "data")
    recipes = []
    for stage, method in COMBOS:
        recipes.append(write_recipe(
            root / f"zero{stage}-{method}.yaml",
            model="builtin:tiny", method=method,
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            data={"train": [str(train)], "max_length": 128,
                  "validation": {"files": [str(validation)], "every_steps": 5 if stage == 0 else 0}},
            train={"max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "warmup": 2,
                   "lr": LR[method], "seed": 3},
            deepspeed={"zero": stage}, logging={} if (stage, method) == MEASURED_PEAK else {"peak_tflops": 0.05},
            checkpoint={"every_steps": STEPS},
            output_dir=str(combo_dir(root, stage, method))))
    # LoRA on a local HF model dir (the ZeRO-2 full run's output, saved before this one starts),
    # with gradient checkpointing; the loss must fall from where the full run left it. Twice the
    # steps: a rank-16 adapter on a barely trained model moves the loss by less than its noise in 10.
    recipes.append(write_recipe(
        root / "local-lora.yaml", model=str(combo_dir(root, 2, "full") / "final"), method="lora",
        data={"train": [str(train)], "max_length": 128},
        train={"max_steps": 2 * STEPS, "global_batch": 8, "micro_batch": 4, "warmup": 2, "lr": 1e-2, "seed": 3,
               "gradient_checkpointing": True},
        deepspeed={"zero": 2}, logging={"peak_tflops": 0.05, "tensorboard": False},
        output_dir=str(root / "local-lora")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "integration" / "rank_matrix.py"), *map(str, recipes)],
                          env=env, capture_output=True, text=True, timeout=400)
    (root / "torchrun.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root


@pytest.mark.parametrize("stage,method", COMBOS)
def test_two_rank_training_reduces_loss_and_logs_metrics(matrix, stage, method):
    out = combo_dir(matrix, stage, method)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["kind"] == "run"
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in train]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    for record in train:
        assert len(record["rank_step_seconds"]) == 2 and record["step_seconds"] > 0
        assert record["tokens"] > 0 and record["tokens_per_second"] > 0
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
        # MFU above 100% would be a wrong count or peak: never clamped, so it shows here.
        assert 0 < record["mfu"] <= 1, record
        peak = sum(records[0]["peak_flops_per_rank"])
        assert record["mfu"] == pytest.approx(record["model_flops"] / record["step_seconds"] / peak)
    assert [r["lr"] for r in train[:2]] == pytest.approx([0.0, LR[method] / 2])   # 2 warmup steps: step k at k / 2
    assert train[-1]["lr"] < train[2]["lr"]  # warmup then cosine decay
    validation = [r for r in records if r["kind"] == "validation"]
    assert [r["step"] for r in validation] == ([5, STEPS] if stage == 0 else [STEPS])
    assert all(math.isfinite(r["val_loss"]) for r in validation)
    assert validation[-1]["val_loss"] < losses[0]
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    result = json.loads((out / "result.json").read_text())
    if (stage, method) == MEASURED_PEAK:
        assert records[0]["peak"].startswith("measured fp32 matmul 1024x1024 (CPU): ")
    else:
        assert records[0] == {"kind": "run", "step": 0, "peak": "recipe logging.peak_tflops 0.05 TFLOP/s",
                              "peak_flops_per_rank": [0.05e12, 0.05e12]}
    if method == "full":   # the tiny model's head is its embedding: every parameter is in a matmul
        assert all(r["model_flops"] > 6 * result["n_params"] * r["tokens"] for r in train)
    if method == "lora":
        assert 0 < result["n_trainable"] < result["n_params"] / 5
    else:
        assert result["n_trainable"] == result["n_params"]


@pytest.mark.parametrize("stage,method", COMBOS)
def test_saved_model_reloads_to_the_trained_logits(matrix, stage, method):
    final = combo_dir(matrix, stage, method) / "final"
    assert not list(final.parent.glob(".final*")), "staging dir left behind"
    if method == "full":
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(final).eval()
    else:
        assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
        assert not (final / "model.safetensors").exists()
        model, _ = load_for_generation(final)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
    trained = torch.load(final.parent / "engine_logits.pt")
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)


def test_generate_command_answers_from_a_full_model(matrix):
    final = combo_dir(matrix, 2, "full") / "final"
    done = subprocess.run([DEEPFLEET, "generate", str(final), "upper abc", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_for_generation(final)
    expected = generate_answers(model, tokenizer, [[{"role": "user", "content": "upper abc"}]], max_new_tokens=8)[0]
    assert done.stdout == expected + "\n"  # print() adds one newline
    assert "Traceback" not in done.stderr


def test_generate_from_a_lora_adapter_dir(matrix):
    model, tokenizer = load_for_generation(combo_dir(matrix, 0, "lora") / "final")
    answers = generate_answers(model, tokenizer, [[{"role": "user", "content": "reverse abc"}],
                                                  [{"role": "user", "content": "upper xyz"}]], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_lora_on_a_local_model_dir_with_gradient_checkpointing(matrix):
    out = matrix / "local-lora"
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 * STEPS and sum(losses[-3:]) < sum(losses[:3]) - 0.05, losses
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(combo_dir(matrix, 2, "full") / "final")
    assert not (out / "final" / "base").exists()  # a real base model is referenced, not copied
    model, _ = load_for_generation(out / "final")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
    torch.testing.assert_close(logits, torch.load(out / "engine_logits.pt"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage,method", COMBOS)
def test_exported_checkpoint_gives_the_engine_logits(matrix, stage, method, tmp_path):
    out = combo_dir(matrix, stage, method)
    assert (out / "checkpoints" / f"step-{STEPS}" / "COMPLETE").is_file()
    targets = [(tmp_path / "export", False)] + ([(tmp_path / "merged", True)] if method == "lora" else [])
    trained = torch.load(out / "engine_logits.pt")
    for target, merge in targets:
        export_checkpoint(out, to=target, merge=merge)
        if method == "full" or merge:
            assert (target / "model.safetensors").is_file() and not (target / "adapter_config.json").exists()
            model = AutoModelForCausalLM.from_pretrained(target).eval()
        else:
            model, _ = load_for_generation(target)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
        torch.testing.assert_close(logits, trained, atol=1e-4 if merge else 1e-5, rtol=1e-4 if merge else 1e-5)
