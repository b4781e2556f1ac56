"""`deepfleet generate` on a half-written model dir: one error naming the dir and what is wrong."""

import shutil
import sys

import pytest
import torch

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.generate import generation_placement, load_for_generation
from deepfleet.train.model import build_model
from deepfleet.train.save import BASE_SUBDIR, write_model_dir
from deepfleet.train.tokenizer import load_tokenizer


def saved_model_dir(target, method):
    recipe = parse_recipe(f"method: {method}\n")
    tokenizer = load_tokenizer(recipe.model)
    model = build_model(recipe, tokenizer, ds_config={}, precision="fp32", device=torch.device("cpu")).model
    return write_model_dir(model, tokenizer, target, state_dict=None, is_lora=method == "lora",
                           base_model_name=recipe.model.name, save_base_weights=method == "lora")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {method: saved_model_dir(root / method, method) for method in ("full", "lora")}


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])


DAMAGES = {
    "corrupt config.json": ("full", lambda d: (d / "config.json").write_text('{"model_type": ')),
    "missing weights": ("full", lambda d: (d / "model.safetensors").unlink()),
    "truncated weights": ("full", lambda d: truncate(d / "model.safetensors")),
    "corrupt adapter_config.json": ("lora", lambda d: (d / "adapter_config.json").write_text("{")),
    "missing adapter weights": ("lora", lambda d: (d / "adapter_model.safetensors").unlink()),
    "truncated bundled base weights": ("lora", lambda d: truncate(d / BASE_SUBDIR / "model.safetensors")),
}


def test_intact_dirs_load(saved):
    for path in saved.values():
        model, tokenizer = load_for_generation(path)
        assert not model.training and tokenizer.pad_token_id is not None


def test_generate_runs_on_the_first_gpu_when_there_is_one():
    assert generation_placement(cuda_devices=8, bf16_supported=True) == ("cuda:0", torch.bfloat16)
    assert generation_placement(cuda_devices=1, bf16_supported=False) == ("cuda:0", torch.float16)   # V100, T4
    assert generation_placement(cuda_devices=0, bf16_supported=False) == ("cpu", torch.float32)


def test_loaded_model_is_placed_where_the_placement_says(saved, monkeypatch):
    moved = []
    monkeypatch.setattr(sys.modules[load_for_generation.__module__], "_placement", lambda: ("meta", torch.float32))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: moved.append(device) or self)
    load_for_generation(saved["full"])
    assert moved == ["meta"]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_model_dir_is_one_error_naming_the_dir(saved, tmp_path, damage):
    method, apply = DAMAGES[damage]
    path = shutil.copytree(saved[method], tmp_path / "model")
    apply(path)
    with pytest.raises(DeepfleetError) as info:
        load_for_generation(path)
    text = info.value.render()
    assert text.count("\n") == 0 and "damaged or incomplete" in text, text
    assert info.value.problems[0].where == str(path) and "deepfleet export" in info.value.problems[0].fix


def test_model_dir_without_tokenizer_files_says_so(saved, tmp_path):
    path = shutil.copytree(saved["full"], tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(DeepfleetError, match="no tokenizer files") as info:
        load_for_generation(path)
    assert info.value.problems[0].where == str(path)
