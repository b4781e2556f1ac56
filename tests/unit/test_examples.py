"""Every shipped example recipe parses, and the commented one explains every key it sets."""

from pathlib import Path

import pytest
import yaml

from deepfleet.plan.recipe_io import load_recipe

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
RECIPES = sorted([*EXAMPLES.rglob("*.y*ml"), *(REPO / "src" / "deepfleet" / "assets").rglob("*.y*ml")])


def test_examples_exist():
    assert any(p.name == "demo.yaml" for p in RECIPES)
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.output_dir


def test_real_size_example_comments_every_key():
    path = EXAMPLES / "qwen2.5-7b-lora.yaml"
    uncommented = [line for line in path.read_text().splitlines()
                   if ":" in line and not line.lstrip().startswith("#") and "#" not in line
                   and not line.rstrip().endswith(":")]
    assert uncommented == []
    assert yaml.safe_load(path.read_text())["method"] == "lora"
