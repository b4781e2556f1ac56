"""How a rank picks its peak FLOP/s: recipe, then the GPU table, then a matmul measured in the run's dtype."""

import pytest
import torch

from deepfleet.train.peak import (CPU_MATMUL_SIZE, GPU_MATMUL_SIZE, PeakChoice, RankPeak, choose_peak, flops_text,
                                  measure_matmul_flops, peak_summary, rank_peak)


def choose(*, tflops=None, device="cuda", name="NVIDIA H100 80GB HBM3", precision="bf16") -> PeakChoice:
    return choose_peak(recipe_peak_tflops=tflops, device_type=device, device_name=name, precision=precision)


def test_the_recipe_wins_over_everything():
    choice = choose(tflops=400.0)
    assert (choice.source, choice.tflops) == ("recipe", 400.0)
    assert choice.description == "recipe logging.peak_tflops 400 TFLOP/s"
    assert choose(tflops=0.05, device="cpu", name=None, precision="fp32").tflops == 0.05


@pytest.mark.parametrize("name,precision,tflops", [("NVIDIA H100 80GB HBM3", "bf16", 989.4),
                                                   ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
                                                   ("Tesla V100-SXM2-32GB", "fp16", 125.0),
                                                   ("AMD Instinct MI300X", "bf16", 1307.4)])
def test_a_known_gpu_takes_its_table_peak_for_the_runs_precision(name, precision, tflops):
    choice = choose(name=name, precision=precision)
    assert (choice.source, choice.tflops) == ("table", tflops)
    assert choice.description == f"table: {name} {precision} {tflops:g} TFLOP/s"


def test_an_unknown_gpu_measures_a_large_matmul_in_the_runs_dtype():
    choice = choose(name="NVIDIA B200", precision="bf16")
    assert (choice.source, choice.tflops, choice.matmul_dtype, choice.matmul_size) == ("measure", None, "bf16", 4096)
    assert choice.description == "measured bf16 matmul 4096x4096 (NVIDIA B200: not in the peak table)"
    assert choose(name="NVIDIA B200", precision="fp16").matmul_dtype == "fp16"


def test_a_known_gpu_without_a_figure_for_the_precision_measures_too():
    assert choose(name="Tesla V100-SXM2-32GB", precision="bf16").matmul_dtype == "bf16"
    fp32 = choose(name="NVIDIA H100 80GB HBM3", precision="fp32")
    assert (fp32.source, fp32.matmul_dtype, fp32.matmul_size) == ("measure", "fp32", GPU_MATMUL_SIZE)
    assert "no fp32 figure in the peak table" in fp32.description


def test_a_cpu_measures_fp32_and_a_gpu_never_measures_a_small_fp32_matmul():
    cpu = choose(device="cpu", name=None, precision="fp32")
    assert (cpu.source, cpu.matmul_dtype, cpu.matmul_size) == ("measure", "fp32", CPU_MATMUL_SIZE)
    assert cpu.description == "measured fp32 matmul 1024x1024 (CPU)"
    for name in ("NVIDIA B200", "NVIDIA H100 80GB HBM3", "Tesla T4"):
        for precision in ("bf16", "fp16", "fp32"):
            choice = choose(name=name, precision=precision)
            assert choice.source == "table" or (choice.matmul_size == 4096 and choice.matmul_dtype == precision)


def test_measuring_on_cpu_gives_a_plausible_figure_and_says_so():
    assert 1e8 < measure_matmul_flops(torch.device("cpu"), dtype=torch.float32, size=128, seconds=0.05) < 1e13
    choice = PeakChoice(source="measure", tflops=None, matmul_dtype="fp32", matmul_size=128, description="measured x")
    peak = rank_peak(choice, torch.device("cpu"))
    assert peak.flops > 0 and peak.measured and peak.description == f"measured x: {flops_text(peak.flops)}"
    known = rank_peak(choose(), torch.device("cpu"))
    assert known.flops == pytest.approx(989.4e12) and known.description == choose().description


def test_flops_text_and_the_summary_of_ranks_that_differ():
    assert flops_text(989.4e12) == "989.4 TFLOP/s" and flops_text(88.74e9) == "88.7 GFLOP/s"
    assert flops_text(146.7e9, 137.1e9) == "137.1 to 146.7 GFLOP/s"
    measured = RankPeak(flops=137.1e9, source="measured fp32 matmul 1024x1024 (CPU)", measured=True)
    assert peak_summary(measured, [137.1e9, 137.2e9]) == "measured fp32 matmul 1024x1024 (CPU): 137.1 GFLOP/s"
    assert peak_summary(measured, [137.1e9, 146.7e9]) == ("measured fp32 matmul 1024x1024 (CPU): "
                                                         "137.1 to 146.7 GFLOP/s per rank")
    table = RankPeak(flops=989.4e12, source="table: NVIDIA H100 80GB HBM3 bf16 989.4 TFLOP/s", measured=False)
    assert peak_summary(table, [989.4e12] * 8) == table.source
    assert peak_summary(table, [989.4e12, 312e12]) == f"{table.source} on rank 0; 312.0 to 989.4 TFLOP/s over the ranks"
