"""A sample of the fuzzing through the real CLI entry point in-process: mutated recipes, DeepSpeed JSON and
hostfiles end in exit 0, or exit 2 with only `error: ` lines; never a traceback, never a file written."""

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bad_input_harness import GOOD_RECIPE, run_main, snapshot
from fuzz_inputs import json_text, yaml_text
from test_fuzz_fleet_inputs import hostfile_text
from test_fuzz_recipe_inputs import VALID_DEEPSPEED, VALID_RECIPE

CLI_EXAMPLES = max(10, settings.default.max_examples // 3)   # each run is a whole command


def _ends_cleanly(monkeypatch, capsys, files: dict[str, str], args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, text in files.items():
            (root / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        before = snapshot(root)
        monkeypatch.chdir(root)
        # A mutated model name must not wait on the network: huggingface_hub reads the variable once, at
        # import, so an earlier test's import would otherwise leave it online.
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        try:
            code, _, err = run_main(monkeypatch, capsys, [arg.replace("{tmp}", tmp) for arg in args])
        finally:
            monkeypatch.undo()   # back to the first directory before this one is removed
        assert "Traceback" not in err and code in (0, 2), (code, err)
        if code == 2:
            assert err and all(line.startswith("error: ") for line in err.splitlines()), err
            assert snapshot(root) == before


@settings(max_examples=CLI_EXAMPLES, deadline=None)   # the first run imports the planner
@given(yaml_text(VALID_RECIPE | {"data": {"train": "builtin:tasks"}}))
def test_fuzz_cli_plan(monkeypatch, capsys, text):
    _ends_cleanly(monkeypatch, capsys, {"r.yaml": text}, ["plan", "r.yaml", "--nodes", "1", "--gpus-per-node", "1"])


@settings(max_examples=CLI_EXAMPLES, deadline=None)   # the first run imports the planner
@given(json_text(VALID_DEEPSPEED))
def test_fuzz_cli_check_ds_config(monkeypatch, capsys, text):
    _ends_cleanly(monkeypatch, capsys, {"ds.json": text},
                  ["check-ds-config", "ds.json", "--nodes", "1", "--gpus-per-node", "2", "--accelerator", "cuda"])


@settings(max_examples=CLI_EXAMPLES, deadline=None)   # the first run imports the planner
@given(hostfile_text())
def test_fuzz_cli_hostfile(monkeypatch, capsys, text):
    _ends_cleanly(monkeypatch, capsys, {"hosts": text}, ["hostfile", "--hostfile", "hosts", "-o", "{tmp}/out"])


GRID_KEYS = st.sampled_from(["train.lr", "lora.r", "train.lrr", "env.X", "data.validation.split", "model", "a..b",
                             "output_dir.x", ""])
GRID_VALUES = st.text(alphabet=st.sampled_from(list("0123456789.,-e[]{}'\"abc: \x00\n")), max_size=20)


@settings(max_examples=CLI_EXAMPLES, deadline=None)
@given(st.lists(st.tuples(GRID_KEYS, GRID_VALUES), max_size=3), st.one_of(st.none(), st.integers(1, 5)))
def test_fuzz_cli_sweep_grid(monkeypatch, capsys, grid, random_count):
    args = [arg for key, values in grid for arg in ("--grid", f"{key}={values}")]
    args += ["--random", str(random_count)] if random_count else []
    _ends_cleanly(monkeypatch, capsys, {"r.yaml": GOOD_RECIPE}, ["sweep", "r.yaml", "--dry-run", *args])
