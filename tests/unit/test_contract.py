"""The head and the ranks share one contract: round trips through it, and the import rules that
keep the layers apart, read from the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from deepfleet import contract
from deepfleet.launch.host_agent import heartbeats
from deepfleet.train.metrics import Heartbeat

SRC = Path(__file__).resolve().parents[2] / "src" / "deepfleet"


def test_heartbeat_round_trip_ignores_the_temporary_file(tmp_path):
    Heartbeat(str(tmp_path), 3, every_seconds=0).beat(17, force=True)
    Heartbeat(str(tmp_path), 0, every_seconds=0).busy()
    (tmp_path / "rank-0.tmp").write_text("5 1.0\n")   # a rank caught between write and rename
    seen = heartbeats(tmp_path)
    assert {rank: beat["step"] for rank, beat in seen.items()} == {"3": 17, "0": contract.HEARTBEAT_BUSY_STEP}


def test_rank_lines_round_trip():
    line = "[4]:" + contract.preempted_line(12, "/runs/x/checkpoints/step-12")
    assert contract.RANK_PREEMPTED_LINE.match(line) and contract.RANK_LINE.match(line).group(1) == "4"
    assert contract.preempted_at(line) == (12, "/runs/x/checkpoints/step-12")
    error = contract.RANK_ERROR_LINE.match("[1]:error: model.name: bad (fix: other)")
    assert error.groups() == ("1", "error: model.name: bad (fix: other)")
    assert contract.RANK_LINE.match(contract.rank_prefix(4) + "x").group(1) == "4"


def test_the_contract_module_needs_only_the_standard_library():
    code = ("import sys, deepfleet.contract, deepfleet.launch.host_agent; "
            "print(sorted(m for m in ('torch', 'yaml', 'pydantic', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(path.relative_to(SRC)): imported_modules(path) for path in (SRC / layer).rglob("*.py")}


def offenders(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{file} imports {name}" for file, names in layer_imports(layer).items() for name in names
                  if name.startswith(forbidden))


def test_train_never_imports_launch_or_fleet():
    assert offenders("train", ("deepfleet.launch", "deepfleet.fleet", "deepfleet.cli")) == []


def test_launch_never_imports_train():
    assert offenders("launch", ("deepfleet.train", "deepfleet.cli")) == []


def test_plan_is_pure():
    assert offenders("plan", ("deepfleet.launch", "deepfleet.fleet", "deepfleet.train", "deepfleet.cli",
                              "subprocess", "socket", "torch.distributed")) == []


def test_sweep_never_imports_cli_and_of_train_only_what_needs_no_torch():
    assert offenders("sweep", ("deepfleet.cli",)) == []
    assert {name for names in layer_imports("sweep").values() for name in names if name.startswith("deepfleet.train")} \
        <= {"deepfleet.train.checkpoint_layout", "deepfleet.train.metrics"}
    code = "import sys, deepfleet.cli.sweep_cmd; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_fleet_never_imports_plan_and_its_modules_form_no_cycle():
    assert offenders("fleet", ("deepfleet.plan", "deepfleet.launch", "deepfleet.train", "deepfleet.cli")) == []
    fleet = {file.removesuffix(".py").replace("/", "."): {n.removeprefix("deepfleet.") for n in names}
             for file, names in layer_imports("fleet").items()}
    for module, names in fleet.items():
        for other in names & fleet.keys():
            assert module not in fleet[other], f"{module} and {other} import each other"
