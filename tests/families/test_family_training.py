"""Two-rank CPU training of every family (`family_matrix.TRAINING_RUNS`: LoRA `all-linear` under
ZeRO-3, and full under ZeRO-2 or ZeRO-3): the loss falls, the saved and exported models reproduce
the engine's logits, a LoRA merge equals the adapter, `generate` applies the chat template, and MoE
models log their router loss while routing differently on each rank under ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from deepfleet.train.builtin import builtin_task_records
from deepfleet.train.export import export_checkpoint
from deepfleet.train.families import FAMILIES, choose_attention
from deepfleet.train.generate import chat_prompt, generate_answers, generation_stop_ids, load_for_generation
from deepfleet.train.metrics import read_metrics

from family_matrix import TRAINING_RUNS
from rank_families import PROBE

pytestmark = pytest.mark.integration

STEPS = 8
LORA_LR = {"bloom": 3e-2}   # unpacked rows: a quarter of the tokens per step; 1e-2 moves its loss too slowly
QUESTIONS = [[{"role": "user", "content": "upper abc"}], [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "reverse hello"}]]


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in builtin_task_records(240, seed=5, split="train")))
    return path


def recipe_for(run, model_dir: Path, data: Path, output: Path) -> dict:
    return {"model": str(model_dir), "method": run.method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": [str(data)], "max_length": 96, "packing": FAMILIES[run.family].packing != "refused"},
            "train": {"max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "warmup": 1, "seed": 3,
                      "lr": 3e-3 if run.method == "full" else LORA_LR.get(run.family, 1e-2)},
            "deepspeed": {"zero": run.zero}, "checkpoint": {"every_steps": STEPS},
            "logging": {"peak_tflops": 0.05, "tensorboard": False}, "output_dir": str(output)}


@pytest.fixture(scope="module")
def trained(family_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    data = write_data(root / "data")
    paths = []
    for run in TRAINING_RUNS:
        recipe = recipe_for(run, family_models[run.family].model_dir, data, root / run.name)
        path = root / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        paths.append(str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).with_name("rank_families.py")), *paths],
                          env=env, capture_output=True, text=True, timeout=900)
    (root / "torchrun.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return root


def engine_logits(out: Path) -> torch.Tensor:
    return torch.load(out / "engine_logits.pt")


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()


@pytest.mark.parametrize("run", TRAINING_RUNS, ids=lambda run: run.name)
def test_loss_falls_and_moe_logs_the_router_loss(trained, run):
    records = [r for r in read_metrics(trained / run.name / "metrics.jsonl") if r["kind"] == "train"]
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    aux = [r["router_aux_loss"] for r in records]
    if FAMILIES[run.family].is_moe:
        assert all(value > 0 for value in aux), aux
    else:
        assert all(value is None for value in aux)


@pytest.mark.parametrize("run", TRAINING_RUNS, ids=lambda run: run.name)
def test_final_and_exported_models_give_the_engine_logits(trained, run, tmp_path):
    out = trained / run.name
    if run.method == "full":
        final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    else:
        final, _ = load_for_generation(out / "final")
    torch.testing.assert_close(probe_logits(final), engine_logits(out), atol=1e-5, rtol=1e-5)
    export_checkpoint(out, to=tmp_path / "export", merge=False)
    exported = (AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval() if run.method == "full"
                else load_for_generation(tmp_path / "export")[0])
    torch.testing.assert_close(probe_logits(exported), engine_logits(out), atol=1e-5, rtol=1e-5)
    if run.method == "lora":
        export_checkpoint(out, to=tmp_path / "merged", merge=True)
        assert not (tmp_path / "merged" / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(probe_logits(merged), engine_logits(out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("run", [run for run in TRAINING_RUNS if run.method == "full"], ids=lambda run: run.name)
def test_generate_applies_the_chat_template(trained, run):
    model, tokenizer = load_for_generation(trained / run.name / "final")
    answers = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=6)
    for messages, answer in zip(QUESTIONS, answers):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat_prompt(tokenizer, messages).endswith(prompt)
        ids = torch.tensor([tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            output = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=generation_stop_ids(model, tokenizer))
        assert answer == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    saved = json.loads((trained / run.name / "final" / "generation_config.json").read_text())
    stops = saved["eos_token_id"] if isinstance(saved["eos_token_id"], list) else [saved["eos_token_id"]]
    assert set(generation_stop_ids(model, tokenizer)) <= set(stops)


@pytest.mark.parametrize("run", TRAINING_RUNS, ids=lambda run: run.name)
def test_run_header_names_the_family_and_its_attention(trained, run):
    family = FAMILIES[run.family]
    choice = choose_attention(family, requested="auto", device_type="cpu", packed_rows=family.packing != "refused",
                              flash_available=False)
    header = f"{run.method} | ZeRO-{run.zero} | 2 ranks on cpu | {family.label}, attention {choice.describe()}"
    assert header in (trained / "torchrun.log").read_text()


@pytest.mark.parametrize("family", [name for name, family in FAMILIES.items() if family.is_moe])
def test_moe_experts_were_routed_differently_on_each_rank_under_zero3(trained, family):
    run = next(run for run in TRAINING_RUNS if run.family == family and run.zero == 3 and run.method == "full")
    result = json.loads((trained / run.name / "result.json").read_text())
    assert result["zero3_leaf_modules"] == [FAMILIES[family].moe_block]
    per_rank = [json.loads((trained / run.name / f"routing-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert per_rank[0].keys() == per_rank[1].keys() and per_rank[0]
    assert any(per_rank[0][layer] != per_rank[1][layer] for layer in per_rank[0]), per_rank
