"""bench train: figures from metrics.jsonl records, scaling efficiency, slow-host flag, table/JSON/PNG, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from deepfleet.bench.scaling import NodeResult, parse_node_counts, summarize, with_efficiency
from deepfleet.bench.scaling_render import plot_scaling, scaling_json, scaling_table
from deepfleet.bench.train_run import ScalingOptions, check_recipe, recipe_for_count
from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import Recipe


def records(rank_seconds: list[list[float]], tokens: int = 1000) -> list[dict]:
    out = [{"kind": "run", "step": 0, "peak": "table: NVIDIA A10G bf16 70 TFLOP/s"},
           {"kind": "validation", "step": 1, "val_loss": 1.0}]
    for step, ranks in enumerate(rank_seconds, start=1):
        out.append({"kind": "train", "step": step, "tokens": tokens, "step_seconds": max(ranks),
                    "rank_step_seconds": ranks, "mfu": 0.25})
    return out


def test_summary_skips_warmup_and_maps_ranks_to_hosts():
    # 2 hosts x 2 ranks; step 1 is a slow warm-up; ranks 2-3 (host b) are slower afterwards
    result = summarize(records([[9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]),
                       nodes=2, hosts=["a", "b"], ranks_per_host=2, warmup_steps=1)
    assert result.timed_steps == 2 and result.ranks == 4
    assert result.tokens_per_second == pytest.approx(2000 / 4.0)
    assert [(h.host, h.mean_step_seconds) for h in result.hosts] == [("a", 1.0), ("b", 2.0)]
    assert result.slow_host.host == "b" and result.mfu == pytest.approx(0.25)
    assert result.mfu_peak == "table: NVIDIA A10G bf16 70 TFLOP/s"


def test_no_slow_host_within_the_margin():
    result = summarize(records([[1.0, 1.05]]), nodes=2, hosts=["a", "b"], ranks_per_host=1, warmup_steps=0)
    assert result.slow_host is None and result.slowest.host == "b"


def test_scaling_efficiency_against_one_node():
    one = summarize(records([[1.0]] * 3), nodes=1, hosts=["a"], ranks_per_host=1, warmup_steps=0)
    two = summarize(records([[0.625, 0.625]] * 3), nodes=2, hosts=["a", "b"], ranks_per_host=1, warmup_steps=0)
    scaled = with_efficiency([one, two])
    assert scaled[0].scaling_efficiency == pytest.approx(1.0)
    assert scaled[1].scaling_efficiency == pytest.approx((1000 / 0.625) / (2 * 1000))   # 0.8
    assert with_efficiency([two])[0].scaling_efficiency is None


def test_no_steps_is_a_user_error():
    with pytest.raises(DeepfleetError):
        summarize([], nodes=1, hosts=["a"], ranks_per_host=1, warmup_steps=0)


@pytest.mark.parametrize("text, size, expected", [("1,2", 2, [1, 2]), ("4, 1,2,2", 4, [1, 2, 4])])
def test_node_counts(text, size, expected):
    assert parse_node_counts(text, fleet_size=size) == expected


@pytest.mark.parametrize("text", ["1,x", "0,1", "1,8", ""])
def test_bad_node_counts(text):
    with pytest.raises(DeepfleetError) as error:
        parse_node_counts(text, fleet_size=4)
    assert "--nodes" in error.value.render()


def test_rendering(tmp_path: Path):
    one = summarize(records([[1.0]]), nodes=1, hosts=["a"], ranks_per_host=1, warmup_steps=0)
    two = summarize(records([[0.5, 0.9]]), nodes=2, hosts=["a", "b"], ranks_per_host=1, warmup_steps=0)
    results = with_efficiency([one, two])
    console = Console(record=True, width=220)
    console.print(scaling_table(results))
    text = console.export_text()
    assert "56%" in text and "b (slow)" in text and "1,111" in text   # 1000/0.9 tok/s; /(2 x 1000)
    assert "MFU peak: table: NVIDIA A10G bf16 70 TFLOP/s" in text
    data = json.loads(scaling_json(results))
    assert data[1]["slow_host"] == "b" and data[1]["scaling_efficiency"] == pytest.approx(1000 / 0.9 / 2000)
    plot_scaling(results, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_per_count_and_checks(tmp_path: Path):
    recipe = Recipe(output_dir=str(tmp_path / "run"), checkpoint={"every_steps": 5}, deepspeed={"zero": 2})
    counted = recipe_for_count(recipe, 2, 7)
    assert counted.output_path == (tmp_path / "run" / "bench-nodes-2").resolve()
    assert counted.train.max_steps == 7 and counted.checkpoint.every_steps == 0 and not counted.resume
    with pytest.raises(DeepfleetError, match="deepspeed"):
        check_recipe(Recipe(deepspeed="auto"), ScalingOptions(node_counts=[1]))
    with pytest.raises(DeepfleetError, match="--steps"):
        check_recipe(recipe, ScalingOptions(node_counts=[1], steps=3, warmup_steps=3))
