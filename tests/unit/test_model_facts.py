"""The head's model facts: computed through transformers once, then read without torch or transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BloomConfig, Qwen2Config

from deepfleet.errors import DeepfleetError
from deepfleet.hardware import gpu_driver_present
from deepfleet.plan.memory import model_shape_from_config
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train import model_facts as facts_module
from deepfleet.train.model_facts import facts_key, model_facts


def _model_dir(tmp_path: Path, config, name: str = "model") -> Path:
    path = tmp_path / name
    config.save_pretrained(path)
    return path


def _qwen(**overrides) -> Qwen2Config:
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300)
    return Qwen2Config(**values | overrides)


def test_kept_facts_equal_what_transformers_computes(tmp_path):
    model = _model_dir(tmp_path, _qwen())
    recipe = parse_recipe(f"model: {model}\nmethod: lora\nlora: {{r: 4}}\n")
    first = model_facts(recipe, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    kept = model_facts(recipe, cache_dir=tmp_path / "cache")
    from transformers import AutoConfig
    expected = model_shape_from_config(AutoConfig.from_pretrained(model), method="lora", lora_rank=4)
    assert first.shape == kept.shape == expected and kept.model_type == "qwen2"


def test_a_changed_config_or_recipe_field_is_computed_again(tmp_path):
    model = _model_dir(tmp_path, _qwen())
    recipe = parse_recipe(f"model: {model}\n")
    small = model_facts(recipe, cache_dir=tmp_path / "cache")
    lora = parse_recipe(f"model: {model}\nmethod: lora\n")
    assert facts_key(lora) != facts_key(recipe)
    assert model_facts(lora, cache_dir=tmp_path / "cache").shape.trainable_params < small.shape.trainable_params
    _model_dir(tmp_path, _qwen(num_hidden_layers=4))   # same dir, new config.json
    assert model_facts(recipe, cache_dir=tmp_path / "cache").shape.num_layers == 4


def test_unreadable_kept_facts_are_computed_again(tmp_path):
    recipe = parse_recipe(f"model: {_model_dir(tmp_path, _qwen())}\n")
    kept = tmp_path / "cache" / f"{facts_key(recipe)}.json"
    kept.parent.mkdir()
    kept.write_text('{"model_type": "qwen2", "shape": {"total_params": 1')
    assert model_facts(recipe, cache_dir=tmp_path / "cache").shape.num_layers == 2
    assert json.loads(kept.read_text())["shape"]["num_layers"] == 2


def test_packing_is_checked_on_kept_facts_too(tmp_path):
    model = _model_dir(tmp_path, BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=100))
    model_facts(parse_recipe(f"model: {model}\ndata: {{packing: false}}\n"), cache_dir=tmp_path / "cache")
    with pytest.raises(DeepfleetError, match="data.packing"):
        model_facts(parse_recipe(f"model: {model}\ndata: {{packing: true}}\n"), cache_dir=tmp_path / "cache")


def test_refusals_and_own_code_are_not_kept(tmp_path):
    cache = tmp_path / "cache"
    model = _model_dir(tmp_path, _qwen())
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({"model_type": "gptj", "n_embd": 32, "n_layer": 1, "n_head": 2}))
    with pytest.raises(DeepfleetError, match="not a family"):
        model_facts(parse_recipe(f"model: {model}\n"), cache_dir=cache)
    (model / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))   # transformers refuses it
    with pytest.raises(DeepfleetError, match="cannot load the config"):
        model_facts(parse_recipe(f"model: {model}\n"), cache_dir=cache)
    assert not cache.exists()
    (model / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoConfig": "x.Config"}}))
    assert facts_key(parse_recipe(f"model: {model}\n")) is None
    assert facts_key(parse_recipe("model: Qwen/Qwen2.5-7B\n")) is None


def test_an_unwritable_cache_costs_time_not_the_run(tmp_path):
    (tmp_path / "file").write_text("")
    recipe = parse_recipe(f"model: {_model_dir(tmp_path, _qwen())}\n")
    assert model_facts(recipe, cache_dir=tmp_path / "file" / "cache").model_type == "qwen2"


def test_the_code_that_computes_facts_is_in_the_key(tmp_path, monkeypatch):
    recipe = parse_recipe("model: builtin:tiny\n")
    before = facts_key(recipe)
    package = tmp_path / "deepfleet"
    for name in facts_module.FACTS_CODE:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("changed")
    monkeypatch.setattr(facts_module, "__file__", str(package / "train" / "model_facts.py"))
    assert facts_key(recipe) not in (None, before)


def test_kept_facts_are_read_without_torch_or_transformers(tmp_path):
    model = _model_dir(tmp_path, _qwen())
    model_facts(parse_recipe(f"model: {model}\n"), cache_dir=tmp_path / "cache")
    script = (f"import sys; from pathlib import Path; from deepfleet.plan.recipe_io import parse_recipe; "
              f"from deepfleet.train.model_facts import model_facts; "
              f"print(model_facts(parse_recipe('model: {model}'), cache_dir=Path('{tmp_path / 'cache'}')).model_type, "
              f"'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["qwen2", "False", "False"]


def test_gpu_driver_present(tmp_path):
    nvidia = tmp_path / "gpus"
    assert not gpu_driver_present(str(nvidia), (str(tmp_path / "kfd"),))
    nvidia.mkdir()
    assert not gpu_driver_present(str(nvidia), ())          # the driver loaded, no GPU found
    (nvidia / "0000:3b:00.0").mkdir()
    assert gpu_driver_present(str(nvidia), ())
    (tmp_path / "kfd").write_text("")
    assert gpu_driver_present(str(tmp_path / "none"), (str(tmp_path / "kfd"),))
