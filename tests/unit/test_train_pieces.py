"""Small pieces of the rank program that need no ranks: model-source and method checks, MFU,
heartbeats, metrics file and plot, the environment a rank reads."""


import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe_io import parse_recipe
from deepfleet.train.distributed import RankEnv
from deepfleet.train.metrics import (Heartbeat, MetricsWriter, StepMetrics, mfu, mfu_above_one_warning, plot_loss,
                                     read_metrics)
from deepfleet.train.model_facts import check_method_supported, check_model_source


def test_qlora_needs_cuda_then_bitsandbytes(monkeypatch):
    recipe = parse_recipe("method: qlora\n")
    with pytest.raises(DeepfleetError, match="qlora needs a CUDA GPU"):
        check_method_supported(recipe, cuda_available=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DeepfleetError, match="needs the bitsandbytes package") as info:
        check_method_supported(recipe, cuda_available=True)
    assert "deepfleet[qlora]" in info.value.render()
    check_method_supported(parse_recipe("method: lora\n"), cuda_available=False)


def test_model_source_checks_local_dirs_but_not_hub_ids(tmp_path):
    check_model_source(parse_recipe("model: builtin:tiny\n"))
    check_model_source(parse_recipe("model: Qwen/Qwen2.5-7B-Instruct\n"))  # a Hub id: checked when it loads
    with pytest.raises(DeepfleetError, match="does not exist"):
        check_model_source(parse_recipe(f"model: {tmp_path / 'missing'}\n"))
    with pytest.raises(DeepfleetError, match="has no config.json"):
        check_model_source(parse_recipe(f"model: {tmp_path}\n"))
    (tmp_path / "config.json").write_text("{}")
    check_model_source(parse_recipe(f"model: {tmp_path}\n"))


def test_mfu_is_model_flops_per_second_over_the_ranks_summed_peak():
    assert mfu(model_flops=6e9, seconds=1.0, peak_flops=2 * 6e9) == pytest.approx(0.5)
    assert mfu(model_flops=3e9, seconds=0.5, peak_flops=6e9) == pytest.approx(1.0)


def test_mfu_above_one_is_called_a_wrong_peak_not_clamped():
    assert mfu_above_one_warning(1.0, "table: X") is None and mfu_above_one_warning(0.4, "table: X") is None
    warning = mfu_above_one_warning(1.3, "measured fp32 matmul 1024x1024 (CPU): 50.0 GFLOP/s")
    assert warning.startswith("warning: MFU 130% is above 100%") and "(measured fp32 matmul" in warning
    assert "logging.peak_tflops" in warning


def test_heartbeat_only_when_asked_and_throttled(tmp_path, monkeypatch):
    Heartbeat(None, 0, 1.0).beat(3)  # no directory: nothing to do, no error
    beat = Heartbeat(str(tmp_path), 1, 60.0)
    beat.beat(5, force=True)
    step, stamp = (tmp_path / "rank-1").read_text().split()
    assert step == "5" and float(stamp) > 0
    beat.beat(6)  # within 60 s: skipped
    assert (tmp_path / "rank-1").read_text().split()[0] == "5"
    beat.beat(7, force=True)
    assert (tmp_path / "rank-1").read_text().split()[0] == "7"


def step(n, loss):
    return StepMetrics(step=n, epoch=0, loss=loss, lr=1e-3, grad_norm=1.0, tokens=100, step_seconds=0.1,
                       tokens_per_second=1000.0, model_flops=6e8, mfu=0.1, rank_step_seconds=[0.1, 0.09])


def test_metrics_file_resume_drops_steps_after_the_checkpoint_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path, run_info={"peak": "first attempt"})
    for n in range(1, 6):
        writer.write_step(step(n, 5.0 - n))
    writer.write_validation(step=5, val_loss=0.5)
    writer.close()
    resumed = MetricsWriter(tmp_path, resume_after_step=3, run_info={"peak": "resumed"})
    resumed.write_step(step(4, 0.25))
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("run", 0), ("train", 1), ("train", 2), ("train", 3),
                                                         ("train", 4)]
    assert records[0]["peak"] == "resumed"   # one run record: this attempt's
    assert records[-1]["loss"] == 0.25 and records[1]["rank_step_seconds"] == [0.1, 0.09]
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_env_from_launcher_variables(tmp_path):
    env = RankEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "DEEPFLEET_HEARTBEAT_DIR": "/hb"})
    assert (env.rank, env.local_rank, env.world_size, env.heartbeat_dir) == (3, 1, 4, "/hb")
    assert not env.is_main and RankEnv.from_environ({}).is_main


def test_prebuilt_ops_count_only_when_deepspeed_would_load_them():
    from deepfleet.train.distributed import loadable_prebuilt_ops

    installed = {"fused_adam": True, "cpu_adam": True, "async_io": False}
    built = {"version": "2.13", "cuda_version": "12.8", "hip_version": "0.0"}
    here = dict(built_for="cuda", built_with=built, accelerator="cuda")
    assert loadable_prebuilt_ops(installed, **here, runtime={"version": "2.13.0+cu128", "cuda_version": "12.8"}) \
        == {"fused_adam", "cpu_adam"}
    assert not loadable_prebuilt_ops(installed, **here, runtime={"version": "2.14.0", "cuda_version": "12.8"})
    assert not loadable_prebuilt_ops(installed, **here, runtime={"version": "2.13.0", "cuda_version": "13.0"})
    assert not loadable_prebuilt_ops(installed, built_for="cpu", built_with=built, accelerator="cuda",
                                     runtime={"version": "2.13.0"})
