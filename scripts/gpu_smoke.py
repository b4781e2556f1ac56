"""GPU smoke test (issue 13 item 11): training, packing isolation, MFU, generate and export on the local GPUs.

Run it through scripts/gpu_smoke.sh (the repo's .venv, a 5-minute timeout). Without a CUDA GPU it
prints one `skip:` line and exits 0. Each check prints `ok: ...` or `FAIL: ...` with its figures, then
a summary; the exit code is 1 when any check failed.

`--device cpu` runs the same checks on CPU in fp32 with a smaller MFU model. It is for developing
this script on a machine without a GPU and proves nothing about GPUs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; skips without a GPU) or cpu (development only: fp32)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (always kept after a failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # read when CUDA starts: keeps generate and the ranks on CPU too
        os.environ["DS_ACCELERATOR"] = "cpu"      # DeepSpeed would warn that it found no GPU
    from gpu_smoke_target import cpu_target, cuda_target, no_gpu_reason   # torch only: the skip stays fast

    reason = no_gpu_reason() if args.device == "cuda" else None
    if reason:
        print(f"skip: no CUDA GPU here ({reason})")
        return 0
    target = cuda_target() if args.device == "cuda" else cpu_target()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))   # `timeout` stops us: clean up
    root = Path(tempfile.mkdtemp(prefix="deepfleet-gpu-smoke-"))
    print(header(target, root), flush=True)
    started = time.perf_counter()
    report = run_checks(target, root)
    failed = ", ".join(report.failed)
    print(f"summary: {report.passed} ok, {len(report.failed)} FAIL{f' ({failed})' if failed else ''} "
          f"in {time.perf_counter() - started:.0f} s on {target.hardware}"
          + (f"; work dir kept: {root}" if failed or args.keep else ""))
    if not failed and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def header(target, root: Path) -> str:
    if target.device_type == "cpu":
        attention = "development run on CPU: proves nothing about GPUs"
    elif target.flash_installed:
        attention = "flash-attn installed"
    else:
        attention = "flash-attn not installed (sdpa/eager)"
    lines = [f"gpu smoke on {target.hardware}: {target.ranks} rank(s), {target.precision}, {attention}; "
             f"work dir {root}"]
    if target.precision == "fp16":
        lines.append("note: this GPU has no bf16 support: training and the checks run in fp16")
    return "\n".join(lines)


def run_checks(target, root: Path):
    from transformers.utils import logging as transformers_logging

    import gpu_smoke_training as training
    from gpu_smoke_packing import SMOKE_FAMILIES, check_packing_isolation
    from gpu_smoke_target import Report

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    workspace = training.Workspace.under(root)
    training.write_training_data(workspace.data)
    report = Report()
    report.check("train", partial(training.check_tiny_training, target, workspace))
    report.check("loss falls", partial(training.check_loss_falls, workspace))
    report.check("recorded", partial(training.check_recorded_setup, target, workspace))
    for family in SMOKE_FAMILIES:
        report.check(f"packing isolation {family}", partial(check_packing_isolation, family, target))
    report.check("mfu", partial(training.check_mfu, target, workspace))
    report.check("load_for_generation", partial(training.check_generation_placement, target, workspace))
    report.check("deepfleet generate", partial(training.check_generate_cli, workspace))
    report.check("export", partial(training.check_export, target, workspace))
    return report


if __name__ == "__main__":
    sys.exit(main())
