"""The Python API from a plain Python process: load, plan, train (ranks in their own processes,
under the same supervisor), export; bad input raises DeepfleetError."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import json, os, sys
import deepfleet as df

out = sys.argv[1]
recipe = df.load_recipe(None, overrides={"train.max_steps": 3, "train.global_batch": 4, "train.micro_batch": 2,
                                         "checkpoint.every_steps": 3, "output_dir": out, "logging.tensorboard": False})
report = df.plan(recipe)
assert "ZeRO" in report.table() and report.deepspeed_config["train_batch_size"] == 4
result = df.train(recipe, nproc=2, quiet=True)
exported = df.export(result.run_dir, to=os.path.join(out, "..", "exported"))
try:
    df.train(df.load_recipe(None, overrides={"model.name": "/nonexistent", "output_dir": out + "-bad"}))
    raised = None
except df.DeepfleetError as exc:
    raised = exc.render()
print(json.dumps({"exit_code": result.exit_code, "final": str(result.final_dir), "steps": len(
    [r for r in result.metrics if r["kind"] == "train"]), "exported": str(exported), "raised": raised,
    "process_group_here": "torch" in sys.modules and __import__("torch").distributed.is_initialized()}))
"""


def test_the_api_trains_and_exports_from_a_plain_python_process(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit_code"] == 0 and result["steps"] == 3
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert result["raised"].startswith("error: model.name:") and "/nonexistent" in result["raised"]
    assert result["process_group_here"] is False   # the ranks were other processes


def test_import_deepfleet_is_light():
    code = "import sys, deepfleet; print(sorted(m for m in ('torch', 'yaml', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
