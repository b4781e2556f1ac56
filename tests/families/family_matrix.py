"""Which training runs the family tests make, and the README table rendered from them.

`test_family_training.py` trains every run in `TRAINING_RUNS` on 2 CPU ranks and checks loss, export,
LoRA merge and generate; `test_family_packing.py` checks packing under each family's attention.
The README's family table is `render_table()`: `test_family_table.py` fails when they disagree.
Run `python tests/families/family_matrix.py --write` to rewrite the README table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from deepfleet.train.families import FAMILIES, choose_attention

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- families:start -->", "<!-- families:end -->"


@dataclass(frozen=True)
class TrainingRun:
    family: str
    zero: int
    method: str        # "full" or "lora" (target_modules: all-linear)

    @property
    def name(self) -> str:
        return f"{self.family}-zero{self.zero}-{self.method}"


# Every family trains once with LoRA under ZeRO-3, and once in full: half under ZeRO-2, half under
# ZeRO-3 (MoE families under ZeRO-3, where uneven expert routing across ranks matters).
_FULL_UNDER_ZERO3 = {"mixtral", "qwen2_moe", "qwen3_moe", "qwen3", "gemma2", "phi3", "opt", "gpt2"}
TRAINING_RUNS: tuple[TrainingRun, ...] = tuple(
    run for family in FAMILIES
    for run in (TrainingRun(family, 3, "lora"), TrainingRun(family, 3 if family in _FULL_UNDER_ZERO3 else 2, "full")))


def _packing_cell(family) -> str:
    return {"position_ids": "yes", "block_mask": "yes (deepfleet's block mask)",
            "refused": "refused (`data.packing: false`)"}[family.packing]


def _attention_cell(family, device_type: str) -> str:
    packed = family.packing != "refused"
    plain = choose_attention(family, requested="auto", device_type=device_type, packed_rows=packed,
                             flash_available=False).describe()
    if device_type == "cpu":
        return plain
    flash = choose_attention(family, requested="auto", device_type=device_type, packed_rows=packed,
                             flash_available=True).describe()
    return plain if flash == plain else f"{flash}; without flash-attn: {plain}"


def _trained(model_type: str, *, zero: int | None = None, method: str | None = None) -> str:
    runs = [run for run in TRAINING_RUNS if run.family == model_type
            and (zero is None or run.zero == zero) and (method is None or run.method == method)]
    if not runs:
        return "-"
    return ", ".join(sorted({f"ZeRO-{run.zero}" for run in runs})) if zero is None else "yes"


def render_table() -> str:
    lines = ["| family | `model_type` | packing | full | LoRA | ZeRO-3 | export, generate | attention on CPU | "
             "attention on GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for model_type, family in FAMILIES.items():
        lines.append(" | ".join([
            f"| {family.label}", f"`{model_type}`", _packing_cell(family), _trained(model_type, method="full"),
            _trained(model_type, method="lora"), _trained(model_type, zero=3),
            "yes" if _trained(model_type) != "-" else "-",
            _attention_cell(family, "cpu"), _attention_cell(family, "cuda")]) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[start:end].strip()


def write_readme() -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + render_table() + "\n" + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
    print(render_table())
