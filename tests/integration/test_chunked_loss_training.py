"""2-rank CPU training (real torchrun + DeepSpeed) with the chunked loss on and off: the same losses under
ZeRO-3, where the output layer's weight is partitioned and gathered only inside its call, for the built-in
Llama and for a tiny Qwen2-MoE (router loss added, MoE blocks as ZeRO-3 leaves)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.metrics import read_metrics
from deepfleet.train.tokenizer import load_tokenizer

from training_fixtures import PYTHON, REPO, write_recipe, write_task_data

pytestmark = pytest.mark.integration

STEPS = 3
MODELS = ("tiny", "moe")


def write_moe_model(directory: Path) -> Path:
    """A tiny Qwen2-MoE with deepfleet's built-in character tokenizer (and its chat template)."""
    tokenizer = load_tokenizer(ModelSpec())
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, router_aux_loss_coef=0.01,
                            decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunked")
    train, validation = write_task_data(root / "data", n_train=120, n_validation=8)
    names = {"tiny": "builtin:tiny", "moe": str(write_moe_model(root / "moe-model"))}
    recipes = [write_recipe(
        root / f"{model}-{chunked}.yaml", model=names[model], method="full",
        data={"train": [str(train)], "max_length": 128, "validation": {"files": [str(validation)]}},
        train={"max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "warmup": 1, "lr": 3e-3, "seed": 3,
               "chunked_loss": chunked},
        deepspeed={"zero": 3}, logging={"peak_tflops": 0.05, "tensorboard": False},
        output_dir=str(root / f"{model}-{chunked}"))
        for model in MODELS for chunked in (False, True)]
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "integration" / "rank_chunked_loss.py"), *map(str, recipes)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root


@pytest.mark.parametrize("model", MODELS)
def test_chunked_loss_trains_like_the_plain_loss_under_zero3(runs, model):
    results, train = {}, {}
    for chunked in (False, True):
        out = runs / f"{model}-{chunked}"
        results[chunked] = json.loads((out / "result.json").read_text())
        train[chunked] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert results[True]["loss"].startswith("chunked cross-entropy (16 tokens per chunk")
    assert results[False]["loss"] == "plain cross-entropy (train.chunked_loss: false)"
    assert len(train[True]) == STEPS
    for key in ("loss", "grad_norm") + (("router_aux_loss",) if model == "moe" else ()):
        got, want = [r[key] for r in train[True]], [r[key] for r in train[False]]
        assert got == pytest.approx(want, abs=1e-5, rel=0), key
    if model == "moe":
        assert all(r["router_aux_loss"] > 0 for r in train[True])
    assert results[True]["val_loss"] == pytest.approx(results[False]["val_loss"], abs=1e-5, rel=0)
