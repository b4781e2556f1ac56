"""Running one bad input through the real CLI entry point (`deepfleet.cli.app.main`) in-process, and the
snapshot of a directory tree that proves a failed command left nothing behind."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deepfleet.cli.app import main

GOOD_RECIPE = ("model: builtin:tiny\ndata:\n  train: builtin:tasks\n  max_length: 64\n"
               "train:\n  max_steps: 2\n  global_batch: 4\n  micro_batch: 2\noutput_dir: runs/r\n")
GOOD_HOSTFILE = "gpu1 slots=1\ngpu2 slots=1\n"
GOOD_DS_JSON = '{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}\n'
SCHEDULER_ENV = ("SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "PBS_NODEFILE", "PBS_JOBID")


@dataclass(frozen=True)
class Case:
    """One bad input: the argv after `deepfleet`, the files it needs, and the start of its one error line.
    `{tmp}` in args, files and expected is the case's own directory (also the current directory)."""

    args: tuple[str, ...]
    expected: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def id(self) -> str:
        return " ".join(self.args)[:80]


def at(text: str, root: Path) -> str:
    return text.replace("{tmp}", str(root))


# The model facts the head computed through transformers (train/model_facts.py) are kept even when a
# later check refuses the command: whole files about a model that passed its own checks.
MODEL_FACTS = Path("cache") / "deepfleet" / "models"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and dir under root: what a command created, changed or removed."""
    return {str(path.relative_to(root)): (path.lstat().st_size if not path.is_dir() else 0, path.lstat().st_mtime_ns)
            for path in root.rglob("*") if not _model_facts(path.relative_to(root))}


def _model_facts(path: Path) -> bool:
    return path.is_relative_to(MODEL_FACTS) or MODEL_FACTS.is_relative_to(path)


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(at(content, root), encoding="utf-8")


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["deepfleet", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path, env: dict[str, str]) -> None:
    """Run in root, with no scheduler around and every cache under root."""
    monkeypatch.chdir(root)
    for name in SCHEDULER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, at(value, root))


def assert_refused(case: Case, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Exit 2, one `error: ` line starting with the case's expected text, nothing written under root."""
    write_files(root, case.files)
    isolate(monkeypatch, root, case.env)
    before = snapshot(root)
    code, _, err = run_main(monkeypatch, capsys, [at(arg, root) for arg in case.args])
    assert "Traceback" not in err, err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, err)
    assert err.startswith(at(case.expected, root)), err
    assert snapshot(root) == before, "a refused command left files behind"
