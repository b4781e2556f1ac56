"""The shipped tiny tokenizer and tokenizer loading."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import ModelSpec
from deepfleet.train.tokenizer import load_tokenizer, tiny_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]


def test_tiny_tokenizer_has_chat_template_pad_and_eos():
    tokenizer = load_tokenizer(ModelSpec(name="builtin:tiny"))
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "upper abc"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nupper abc<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_tokenizer_round_trips_text_character_by_character():
    tokenizer = load_tokenizer(ModelSpec())
    text = "Add 12 and 7: 19!\n\tdone ~"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("é")["input_ids"]) == "<|unk|>"


def test_shipped_files_match_the_build_script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", REPO / "scripts/build_tiny_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "OUT_DIR", tmp_path)
    script.main()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        built = json.loads((tmp_path / name).read_text())
        shipped = json.loads((tiny_tokenizer_dir() / name).read_text())
        assert built == shipped, f"{name} is stale: rerun scripts/build_tiny_tokenizer.py"


def test_local_tokenizer_dir_loads_and_gets_a_pad_token(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(ModelSpec(name=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


@pytest.mark.parametrize("name", ["/nonexistent/model-dir", "./models/missing"])
def test_missing_local_model_path_names_the_path(name):
    with pytest.raises(DeepfleetError) as caught:
        load_tokenizer(ModelSpec(name=name))
    problem = caught.value.problems[0]
    assert problem.where == "model.name" and Path(name).name in problem.what


def test_unknown_builtin_model():
    with pytest.raises(DeepfleetError, match="builtin:tiny"):
        load_tokenizer(ModelSpec(name="builtin:huge"))
