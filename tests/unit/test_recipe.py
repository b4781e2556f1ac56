import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe


def problems(text, overrides=()):
    with pytest.raises(DeepfleetError) as info:
        parse_recipe(text, "r.yaml", overrides)
    return [p.render() for p in info.value.problems]


def test_defaults_are_the_builtin_demo():
    recipe = parse_recipe("", "r.yaml")
    assert recipe.model.name == "builtin:tiny"
    assert recipe.data.train == ["builtin:tasks"]


def test_unknown_keys_all_reported_with_line_and_suggestion():
    found = problems("model: builtin:tiny\ntrian:\n  lr: 1\ntrain:\n  lrr: 3\n")
    assert any(p.startswith("r.yaml:2: unknown key trian") and 'did you mean "train"' in p for p in found)
    assert any(p.startswith("r.yaml:5: unknown key train.lrr") and 'did you mean "lr"' in p for p in found)


def test_bad_values_name_key_path_and_line():
    found = problems("train:\n  micro_batch: 0\ndeepspeed:\n  zero: 5\n")
    assert any(p.startswith("r.yaml:2: train.micro_batch") for p in found)
    assert any(p.startswith("r.yaml:4: deepspeed.zero") for p in found)


def test_overrides_parse_yaml_values_and_reject_typos():
    recipe = parse_recipe("", "r.yaml", ["train.lr=1e-3", "data.train=a.jsonl", "deepspeed.zero=3"])
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.data.train == ["a.jsonl"]
    assert recipe.deepspeed.zero == 3
    assert any('did you mean "max_length"' in p for p in problems("", ["data.max_lenght=4"]))


def test_deepspeed_shorthands():
    assert parse_recipe("deepspeed: auto").deepspeed.zero == "auto"
    assert parse_recipe("deepspeed: my_ds.json").deepspeed.config == "my_ds.json"
    assert parse_recipe("deepspeed: 3").deepspeed.zero == 3


def test_invalid_yaml_reports_line():
    found = problems("model: [unclosed\ntrain: {}\n")
    assert found[0].startswith("r.yaml:")
