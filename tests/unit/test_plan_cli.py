"""`deepfleet plan` and `deepfleet check-ds-config` end to end (no hub: models are local config dirs)."""

import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from deepfleet.cli import plan_cmd
from deepfleet.errors import DeepfleetError
from plan_model_configs import mistral_7b

app = typer.Typer()
app.command("plan")(plan_cmd.plan)
app.command("check-ds-config")(plan_cmd.check_ds_config)


@pytest.fixture(scope="module")
def mistral_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    mistral_7b().save_pretrained(root / "mistral")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {root / 'mistral'}\ndeepspeed: auto\ndata: {{max_length: 2048}}\n"
                      "train: {global_batch: 64, micro_batch: 4, gradient_checkpointing: true}\n")
    return recipe


def test_plan_json_for_a_local_model_dir(mistral_recipe):
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--gpu-mem", "24GiB", "--nodes", "2",
                                      "--gpus-per-node", "4", "--host-mem", "512GiB", "--link-gbps", "10", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["total_params"] == 7_241_732_096
    assert (plan["choice"]["stage"], plan["choice"]["offload"]) == (2, "optimizer")
    assert plan["deepspeed_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert plan["deepspeed_config"]["train_batch_size"] == 64
    commands = plan["commands"]
    assert commands[0].startswith("job ") and "2 host(s)" in commands[0]
    assert any(line.startswith("[node2] ") and "--node-rank=1" in line and "--nproc=4" in line
               for line in commands), commands
    assert commands[-1].startswith("(at launch:")


def test_plan_for_hosts_not_named_yet_assumes_no_prebuilt_ops(mistral_recipe):
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--gpu-mem", "80GiB", "--gpus-per-node", "8",
                                      "--json"])
    assert result.exit_code == 0, result.output
    params = json.loads(result.output)["deepspeed_config"]["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True


def test_plan_table_and_local_command(mistral_recipe):
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--gpu-mem", "80GiB", "--gpus-per-node", "8"])
    assert result.exit_code == 0, result.output
    assert "memory per rank (GPU)" in result.output and "chosen" in result.output
    assert "reason:" in result.output and '"zero_optimization"' in result.output
    assert "--nproc=8" in result.output


def test_bad_memory_size_is_a_user_error(mistral_recipe):
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--gpu-mem", "lots"])
    assert isinstance(result.exception, DeepfleetError)
    assert result.exception.problems[0].where == "--gpu-mem"


def test_check_ds_config_exits_2_with_one_line_per_problem(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True},
                                "fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    run = subprocess.run([sys.executable, "-m", "deepfleet.cli.app", "check-ds-config", str(path), "--accelerator",
                          "cuda", "--bf16", "--gpus-per-node", "2"], capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2, run.stderr
    assert len(errors) == 2
    assert 'did you mean "overlap_comm"' in errors[0] and "Traceback" not in run.stderr


def test_check_ds_config_fills_auto_from_the_recipe(tmp_path):
    path, recipe = tmp_path / "ds.json", tmp_path / "r.yaml"
    path.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "zero_optimization": {"stage": 2}}))
    recipe.write_text("train: {global_batch: 16, micro_batch: 4}\n")
    result = CliRunner().invoke(app, ["check-ds-config", str(path), "--recipe", str(recipe), "--accelerator", "cpu",
                                      "--gpus-per-node", "2"])
    assert result.exit_code == 0, result.output
    assert 'note: train_batch_size: "auto" -> 16' in result.output
    assert "ok:" in result.output


def check_without_recipe(tmp_path, config: dict, ranks: tuple[str, str] = ("4", "8")):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return CliRunner().invoke(app, ["check-ds-config", str(path), "--nodes", ranks[0], "--gpus-per-node", ranks[1],
                                    "--accelerator", "cuda", "--bf16"])


def test_check_ds_config_without_recipe_counts_only_the_json_and_world_size(tmp_path):
    result = check_without_recipe(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                             "zero_optimization": {"stage": 2}})
    assert result.exit_code == 0, result.output   # not held to the default recipe's global_batch 16
    assert "note: train_batch_size not set: 128" in result.output and "ok:" in result.output
    bad = check_without_recipe(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                          "gradient_accumulation_steps": 1})
    assert [p.what for p in bad.exception.problems] == [
        "train_batch_size 16 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 x world size 32 "
        "(= 128)"]


def test_check_ds_config_without_recipe_leaves_auto_and_batch_sizes_to_the_recipe(tmp_path):
    result = check_without_recipe(tmp_path, {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})
    assert result.exit_code == 0, result.output
    assert ('note: "auto" left for the recipe to fill when training: train_batch_size, '
            "train_micro_batch_size_per_gpu, optimizer.params.lr (pass --recipe to check the values)") in result.output
    assert '"lr": "auto"' in result.output
    bare = check_without_recipe(tmp_path, {"zero_optimization": {"stage": 2}})
    assert bare.exit_code == 0, bare.output
    assert "no train_batch_size or train_micro_batch_size_per_gpu" in bare.output
    assert '"train_batch_size"' not in bare.output


def test_plan_for_a_hostfile_asks_its_hosts_or_takes_gpu_memory_and_its_slots(mistral_recipe, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu1.invalid slots=4\ngpu2.invalid slots=4\n")
    missing = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--fleet", str(hostfile)])
    assert isinstance(missing.exception, DeepfleetError)
    assert [p.where for p in missing.exception.problems] == ["host gpu1.invalid", "host gpu2.invalid"]
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--fleet", str(hostfile), "--gpu-mem", "80GiB",
                                      "--json"])
    assert result.exit_code == 0, result.output
    fleet = json.loads(result.output)["fleet"]
    assert (fleet["nodes"], fleet["ranks_per_node"]) == (2, 4)


def test_check_ds_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'{\n  "zero_optimization": {"stage": 2},\n  "note": "caf\xe9"\n}\n')
    result = CliRunner().invoke(app, ["check-ds-config", str(path), "--accelerator", "cpu"])
    assert isinstance(result.exception, DeepfleetError)
    [problem] = result.exception.problems
    assert problem.where == f"{path}:3" and "not UTF-8 text" in problem.what


def test_check_ds_config_refuses_a_zero_stage_deepspeed_would_only_reject_in_training(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    result = CliRunner().invoke(app, ["check-ds-config", str(path), "--accelerator", "cpu"])
    assert isinstance(result.exception, DeepfleetError)
    assert result.exception.problems[0].where == f"{path}:zero_optimization.stage"


def test_plan_overrides_inside_shorthand_sections(mistral_recipe):
    """The recipe writes `model: DIR` and `deepspeed: auto`; overrides still reach their keys."""
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "--gpu-mem", "80GiB", "--json",
                                      "deepspeed.zero=3", "model.revision=main"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["choice"]["stage"] == 3


def test_plan_blames_a_bad_override_on_the_command_line(mistral_recipe):
    result = CliRunner().invoke(app, ["plan", str(mistral_recipe), "train.lr=abc"])
    assert isinstance(result.exception, DeepfleetError)
    assert result.exception.problems[0].where == "command line (train.lr=abc)"


def test_check_ds_config_refuses_a_duplicate_key_at_its_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "gradient_clipping": 1.0,\n'
                    '  "zero_optimization": {"stage": 3}\n}\n')
    result = CliRunner().invoke(app, ["check-ds-config", str(path), "--accelerator", "cpu"])
    assert isinstance(result.exception, DeepfleetError)
    assert [p.render() for p in result.exception.problems] == [
        f'{path}:4: duplicate key "zero_optimization" (first on line 2); DeepSpeed refuses it '
        "(fix: keep only one of the two)"]


@pytest.mark.parametrize("text", [
    '{"zero_optimization": {"stage": 2,},}',
    '// ZeRO-2\n{"zero_optimization": {"stage": 2}  # no offload\n}',
    '\ufeff{"zero_optimization": {"stage": 2}}',
], ids=["trailing commas", "comments", "byte-order mark"])
def test_check_ds_config_reads_what_deepspeed_reads(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["check-ds-config", str(path), "--accelerator", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"ok: {path} is valid" in result.output
