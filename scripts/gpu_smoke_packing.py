"""Packing isolation under the attention deepfleet picks for the target device, with a negative control.

For each family, a tiny model from tests/families is loaded with the implementation `choose_attention`
picks for packed rows, in the target dtype (flash-attn needs half precision). Each sequence's logits
inside a packed row must match the same sequence alone (same model, same implementation, same dtype).
The control feeds the same rows without what keeps sequences apart (position_ids running on across
the row, no block mask, rows not flattened): it must differ clearly, or the check could not fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "families"))

from family_models import build_family_model, cache_root  # noqa: E402
from packed_logits import examples, load, packed_batch, packed_tensors, packing_error  # noqa: E402

from deepfleet.train.families import FAMILIES, choose_attention  # noqa: E402
from deepfleet.train.model import flash_attention_available  # noqa: E402

from gpu_smoke_target import CONTROL_MARGIN, CheckFailed, Target  # noqa: E402

SMOKE_FAMILIES = ("llama", "qwen2", "gemma2", "opt")


def unisolated_rows(items, *, device: str) -> dict[str, torch.Tensor]:
    """The packed rows with position_ids 0..width-1 on every row: one long sequence per row."""
    tensors = packed_tensors(items)
    rows, width = tensors["input_ids"].shape
    tensors["position_ids"] = torch.arange(width).expand(rows, width).contiguous()
    return {key: value.to(device) for key, value in tensors.items()}


def check_packing_isolation(family: str, target: Target) -> str:
    choice = choose_attention(FAMILIES[family], requested="auto", device_type=target.device_type, packed_rows=True,
                              flash_available=flash_attention_available(target.device_type))
    model = load(build_family_model(family, cache_root()).model_dir, choice.implementation,
                 device=target.device, dtype=target.dtype)
    items = examples(model.config.vocab_size)
    error = packing_error(model, packed_batch(choice, items, device=target.device, mask_dtype=target.dtype),
                          items, model)
    control = packing_error(model, unisolated_rows(items, device=target.device), items, model)
    dtype = str(target.dtype).removeprefix("torch.")
    figures = (f"{choice.describe()} {dtype} max diff {error:.3g} (control {control:.3g}; "
               f"tolerance {target.packing_tolerance:g})")
    if error > target.packing_tolerance:
        raise CheckFailed(f"{figures}: packed sequences see each other")
    if control < CONTROL_MARGIN * target.packing_tolerance:
        raise CheckFailed(f"{figures}: the control differs by less than {CONTROL_MARGIN:g} x the tolerance, "
                          "so this check could not see a leak")
    return figures
