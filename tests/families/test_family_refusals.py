"""What deepfleet refuses about a model, before any rank starts: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import MambaConfig

DEEPFLEET = str(Path(sys.executable).with_name("deepfleet"))


def run_train(tmp_path: Path, model: str, **sections) -> subprocess.CompletedProcess:
    recipe = {"model": model, "data": {"train": ["builtin:tasks"]}, "output_dir": str(tmp_path / "out"), **sections}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ)
    return subprocess.run([DEEPFLEET, "train", "recipe.yaml", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_refusal(done: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_an_unsupported_architecture(tmp_path):
    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path / "mamba")
    assert_one_line_refusal(run_train(tmp_path, str(tmp_path / "mamba")), tmp_path,
                            "model type 'mamba'", "model.name", "llama", "qwen2")


def test_remote_code_unless_the_recipe_allows_it(tmp_path, family_models):
    model = tmp_path / "custom"
    shutil.copytree(family_models["llama"].model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_refusal(run_train(tmp_path, str(model)), tmp_path, "own modeling code",
                            "model.trust_remote_code", "trust_remote_code: true")


def test_remote_code_with_a_model_type_only_its_code_knows(tmp_path):
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps({
        "model_type": "customlm", "architectures": ["CustomLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    assert_one_line_refusal(run_train(tmp_path, str(tmp_path / "custom")), tmp_path, "own modeling code",
                            "model.trust_remote_code")


def test_bloom_with_packing(tmp_path, family_models):
    line = assert_one_line_refusal(run_train(tmp_path, str(family_models["bloom"].model_dir)), tmp_path,
                                   "BLOOM cannot keep packed sequences apart", "data.packing: false")
    assert "data.packing" in line.split(":")[1]


@pytest.mark.parametrize("family,expected", [("falcon", "query_key_value"), ("gpt2", "c_attn"),
                                             ("gpt_neox", "query_key_value"), ("bloom", "dense_h_to_4h")])
def test_lora_targets_the_family_lacks_list_its_real_layers(tmp_path, family_models, family, expected):
    line = assert_one_line_refusal(
        run_train(tmp_path, str(family_models[family].model_dir), method="lora",
                  lora={"target_modules": ["q_proj", "v_proj"]}, data={"train": ["builtin:tasks"], "packing": False}),
        tmp_path, "['q_proj', 'v_proj']", "lora.target_modules", expected)
    assert "lm_head" not in line
