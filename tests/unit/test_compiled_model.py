"""`train.compile`: the choice from recorded facts, the recompile count, and the fallback when compiling fails."""

import os

import pytest
import torch

from deepfleet.errors import DeepfleetError
from deepfleet.train.compiled_model import (CPU_MIN_HIDDEN_FOR_COMPILE, CPU_MIN_STEPS_FOR_COMPILE, CompileChoice,
                                            CompiledModel, choose_compile, compile_engine, fallback_warning)


WIDE, LONG = CPU_MIN_HIDDEN_FOR_COMPILE, CPU_MIN_STEPS_FOR_COMPILE


def test_false_and_true_are_what_they_say_anywhere():
    for device, stage, steps, hidden in (("cpu", 2, 10**6, 4096), ("cuda", 3, 1, 8)):
        facts = dict(device_type=device, zero_stage=stage, method="lora", total_steps=steps, hidden_size=hidden)
        assert not choose_compile(False, **facts).compiled
        assert choose_compile(True, **facts).compiled


def auto(**changes) -> CompileChoice:
    """`auto` for a run like the benchmark's (full fine-tuning on CPU, ZeRO-2), with `changes`."""
    facts = dict(device_type="cpu", zero_stage=2, method="full", total_steps=LONG, hidden_size=WIDE)
    return choose_compile("auto", **{**facts, **changes})


def test_auto_compiles_long_cpu_runs_of_wide_models_at_checked_stages():
    for stage in (0, 1, 2):
        chosen = auto(zero_stage=stage)
        assert chosen.compiled
        assert chosen.describe() == f"compiled (torch.compile, inductor; train.compile: auto: {LONG} steps on CPU)"
    short = auto(total_steps=LONG - 1)
    assert not short.compiled and f"{LONG - 1} steps < {LONG}, too few to pay for the compile time" in short.why
    narrow = auto(hidden_size=96)
    assert not narrow.compiled and f"hidden size 96 < {WIDE}" in narrow.why
    lora = auto(method="lora")
    assert not lora.compiled and "does not compile lora" in lora.why
    zero3 = auto(zero_stage=3)
    assert not zero3.compiled and "ZeRO-3" in zero3.why
    gpu = auto(device_type="cuda")
    assert not gpu.compiled
    assert gpu.describe() == "eager (train.compile: auto compiles only where measured faster, not yet on cuda)"


def test_auto_keeps_the_demo_eager():
    """The demo: the built-in tiny Llama (hidden size 96), 300 steps, where compiling measured no faster."""
    assert not auto(total_steps=300, hidden_size=96).compiled


COMPILED = CompileChoice(compiled=True, why="train.compile: true")


class Engine(torch.nn.Module):
    """What `engine.compile()` does for a DeepSpeed engine without DeepCompile: `module.compile()` with the kwargs
    and backend (deepspeed/runtime/engine.py). The real engine is compiled in
    tests/integration/test_compiled_training.py."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def compile(self, backend, compile_kwargs):
        self.module.compile(**compile_kwargs, backend=backend)

    def forward(self, x):
        return self.module(x)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """Inductor's cache in pytest's temp dir for the rest of this process (not restored: inductor also writes there
    at exit), without precompiled headers (those would go to /tmp/torchinductor_$USER)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    with torch._inductor.config.patch(cpp_cache_precompile_headers=False):
        yield


@pytest.fixture
def fresh_inductor(inductor_cache):
    """Nothing compiled before: each test compiles for real."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


class Block(torch.nn.Module):
    """Defined here: dynamo does not compile frames of torch's own modules (nn.Linear.forward) on their own."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x)) * 2


def test_rows_of_every_length_share_one_graph(fresh_inductor):
    torch.manual_seed(0)
    layer = Block(8).requires_grad_(False)    # a forward-only graph compiles in a few seconds; training: integration
    want = {length: layer(torch.ones(2, length, 8)) for length in (5, 7, 12, 30)}
    compiled = compile_engine(Engine(layer), COMPILED, requested=True)
    assert compiled.recompiles == 0
    for length, expected in want.items():
        got = compiled.run(lambda: layer(torch.ones(2, length, 8)))
        torch.testing.assert_close(got, expected)
    assert compiled.recompiles == 0
    compiled.run(lambda: layer(torch.ones(9, 8)))     # another number of dimensions: a recompile, and it counts
    assert compiled.recompiles == 1
    assert compiled.describe() == "compiled (torch.compile, inductor; train.compile: true)"


def test_eager_run_counts_no_recompiles():
    layer = torch.nn.Linear(4, 4)
    eager = compile_engine(Engine(layer), CompileChoice(compiled=False, why="train.compile: false"), requested=False)
    assert eager.recompiles is None and eager.run(lambda: 3) == 3


@pytest.fixture
def no_cpp_compiler(fresh_inductor):
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        yield


def test_auto_falls_back_to_eager_with_one_warning_line(no_cpp_compiler, capsys):
    layer = Block(4)
    x = torch.randn(3, 4)
    compiled = compile_engine(Engine(layer), CompileChoice(compiled=True, why="train.compile: auto"),
                              requested="auto")
    torch.testing.assert_close(compiled.run(lambda: layer(x)), layer(x))
    assert capsys.readouterr().err == ""      # rank 0 says it for every rank, after the step (train/loop.py)
    assert compiled.newly_fallen_back([True]) == {0} and not compiled.newly_fallen_back([True])
    line = fallback_warning([compiled.fallback], {0})
    assert "\n" not in line and line.startswith("warning: train.compile: compiling the model failed (")
    assert "/nonexistent/g++" in line and line.endswith("; training eager")
    assert compiled.describe().startswith("eager (compiling failed: ")
    torch.testing.assert_close(compiled.run(lambda: layer(x)), layer(x))     # later forwards stay eager


def test_the_warning_names_the_ranks_that_fell_back_and_their_causes():
    assert fallback_warning(["no g++", "no g++"], {0, 1}) == \
        "warning: train.compile: compiling the model failed (no g++); training eager"
    assert fallback_warning(["", "no g++", "", "no g++"], {1, 3}) == (
        "warning: train.compile: compiling the model failed on ranks 1, 3 (no g++); eager there, compiled on 2 of 4 "
        "ranks")
    assert fallback_warning(["out of memory", "no g++"], {0, 1}) == (
        "warning: train.compile: compiling the model failed on rank 0 (out of memory); on rank 1 (no g++); training "
        "eager")


def test_a_later_warning_names_only_the_ranks_not_reported_before():
    causes = ["no g++", "out of memory", "no g++", ""]
    assert fallback_warning(causes, {0, 2}) == (
        "warning: train.compile: compiling the model failed on ranks 0, 2 (no g++); eager there, compiled on 1 of 4 "
        "ranks")
    assert fallback_warning([*causes[:3], "no g++"], {3}) == (
        "warning: train.compile: compiling the model failed on rank 3 (no g++); training eager")


def test_each_new_fallback_is_reported_once():
    model = CompiledModel(choice=COMPILED, requested="auto")
    assert [model.newly_fallen_back(flags) for flags in ([False, False], [False, True], [False, True],
                                                           [True, True], [True, True])] == [
        set(), {1}, set(), {0}, set()]


def test_true_stops_with_one_error_line_when_compiling_fails(no_cpp_compiler):
    layer = Block(4)
    compiled = compile_engine(Engine(layer), COMPILED, requested=True)
    with pytest.raises(DeepfleetError) as raised:
        compiled.run(lambda: layer(torch.randn(3, 4)))
    text = str(raised.value)
    assert "\n" not in text and text.startswith("error: train.compile: compiling the model failed: ")
    assert "/nonexistent/g++" in text and text.endswith("(fix: set train.compile: auto (falls back to eager) or false)")
