"""What a refused command leaves behind: for every command that writes (train, export, hostfile -o, doctor
--record, prepare, sync, train --slurm/--pbs), bad input that is found only late still ends with exit 2 and the
directory tree exactly as it was (nothing created, changed or removed)."""

import os
from pathlib import Path

import pytest

from bad_input_harness import GOOD_HOSTFILE, GOOD_RECIPE, Case, assert_refused

BAD_DATA_RECIPE = GOOD_RECIPE.replace("train: builtin:tasks", "train: d.jsonl")
FAILING_SCHEDULER = "#!/bin/sh\necho '{name}: error: Invalid partition name specified' >&2\nexit 1\n"

CASES = [
    Case(("train", "r.yaml"), "error: d.jsonl:2: malformed JSON line",
         files={"r.yaml": BAD_DATA_RECIPE, "d.jsonl": '{"text": "abc"}\n{"text": \n'}),
    Case(("train", "r.yaml", "--no-resume"), "error: d.jsonl:1: cannot tell the data format from keys txt",
         files={"r.yaml": BAD_DATA_RECIPE, "d.jsonl": '{"txt": "abc"}\n', "runs/r/keep.txt": "old run\n"}),
    Case(("prepare", "r.yaml"), "error: d.jsonl:2: malformed JSON line",
         files={"r.yaml": BAD_DATA_RECIPE, "d.jsonl": '{"text": "abc"}\n{"text": \n'}),
    Case(("prepare", "r.yaml"), "error: d.jsonl:1: record has keys txt",
         files={"r.yaml": BAD_DATA_RECIPE.replace("max_length", "format: text\n  max_length"), "d.jsonl": '{"txt": "a"}\n'}),
    Case(("export", "run", "--to", "out"), "error: {tmp}/run: no complete checkpoint", files={"run/checkpoints/x": "x"}),
    Case(("export", "run", "--to", "out", "--step", "7"), "error: {tmp}/out: --to is a non-empty directory",
         files={"run/checkpoints/step-7/x": "x", "out/keep.txt": "kept\n"}),
    Case(("hostfile", "--hostfile", "hosts", "-o", "out"), "error: hosts:2: not a hostfile line",
         files={"hosts": "gpu1 slots=1\ngpu2\n"}),
    Case(("hostfile", "--hostfile", "hosts", "-o", "out"), "error: hosts:1: slots=0",
         files={"hosts": "gpu1 slots=0\n", "out": "gpu9 slots=1\n"}),
    Case(("doctor", "--hostfile", "hosts", "--record", "facts.json"), "error: hosts:1: not a hostfile line",
         files={"hosts": "gpu1\n"}),
    Case(("doctor", "--hostfile", "hosts", "--record", "facts.json", "--recipe", "r.yaml"), "error: r.yaml:1: unknown key",
         files={"hosts": GOOD_HOSTFILE, "r.yaml": "trian: 1\n", "facts.json": "{}\n"}),
    Case(("sync", "r.yaml", "--hostfile", "hosts", "--to", "rel"), "error: --to rel: the destination must be an absolute path",
         files={"hosts": GOOD_HOSTFILE, "r.yaml": GOOD_RECIPE}),
    Case(("sync", "d", "--hostfile", "hosts"), "error: hosts:1: slots=0",
         files={"hosts": "gpu1 slots=0\n", "d/a.txt": "a\n"}),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_refused_command_leaves_the_tree_as_it_was(case, tmp_path, monkeypatch, capsys):
    assert_refused(case, tmp_path, monkeypatch, capsys)


def _fake_scheduler(root: Path, name: str) -> dict[str, str]:
    """A PATH whose only `name` refuses every job, as a scheduler does for a bad partition."""
    tool = root / "bin" / name
    tool.parent.mkdir()
    tool.write_text(FAILING_SCHEDULER.format(name=name))
    tool.chmod(0o755)
    return {"PATH": f"{root / 'bin'}:{os.environ['PATH']}"}


@pytest.mark.parametrize("flag, tool", [("--slurm", "sbatch"), ("--pbs", "qsub")])
def test_refused_submission_leaves_no_job_dirs(flag, tool, tmp_path, monkeypatch, capsys):
    """The job script is written before the scheduler answers; a refusal removes it and every dir made for it."""
    env = _fake_scheduler(tmp_path, tool)
    case = Case(("train", "r.yaml", flag, "--partition", "nope"), "error: ", files={"r.yaml": GOOD_RECIPE}, env=env)
    assert_refused(case, tmp_path, monkeypatch, capsys)
