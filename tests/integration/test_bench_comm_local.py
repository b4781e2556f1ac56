"""`deepfleet bench comm` on this machine alone: 2 gloo ranks under the supervised launcher, JSON back from rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from training_fixtures import DEEPFLEET  # noqa: E402

pytestmark = pytest.mark.integration


def test_local_comm_benchmark_reports_every_collective_and_skips_what_does_not_fit(tmp_path):
    # --sizes includes 1 TiB: far beyond free memory, so it must come back as skipped, not run.
    done = subprocess.run([DEEPFLEET, "bench", "comm", "--sizes", "4KiB,256KiB,1024GiB", "--budget", "0.1",
                           "--json", "--run-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["backend"], report["n_ranks"], report["n_hosts"]) == ("gloo", 2, 1)
    measured = {(m["operation"], m["size_bytes"]) for m in report["measurements"]}
    assert measured == {(op, size) for op in ("all_reduce", "all_gather", "reduce_scatter")
                        for size in (4096, 256 * 1024)}
    for m in report["measurements"]:
        assert m["seconds"] > 0 and m["iterations"] >= 1
        assert m["algbw"] == pytest.approx(m["size_bytes"] / m["seconds"])
        assert m["best_seconds"] <= m["seconds"] * 1.0001
    assert {(s["operation"], s["reason"]) for s in report["skipped"]} == {
        ("all_reduce", "memory"), ("all_gather", "memory"), ("reduce_scatter", "memory")}
    assert list((tmp_path / "runs").glob("comm-*/logs/attempt-0/*.log"))
