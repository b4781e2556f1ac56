"""Logits of sequences packed into rows vs the same sequences alone, for any device and dtype.

Shared by `test_family_packing.py` (CPU, fp32, against eager) and `scripts/gpu_smoke.py` (the GPU's
attention choice in bf16, against the same implementation). No pytest here: the smoke script runs
where only the runtime dependencies are installed.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from deepfleet.train.batches import collate
from deepfleet.train.dataset import TokenizedExample
from deepfleet.train.packed_attention import model_inputs

LENGTHS = [23, 7, 30, 12, 5, 19]
ROWS = [[0, 1, 2], [3, 4, 5], [1, 4]]   # uneven: the short row gets a padding segment
QUERY_KEY_WEIGHTS = ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight", "c_attn.weight")
SHARPEN = 12.0


def examples(vocab_size: int) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(3)
    made = []
    for length in LENGTHS:
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        made.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return made


def load(model_dir, implementation: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The fixture model with query/key weights scaled up: random init gives near-uniform attention,
    where a wrong mask, window or soft-cap changes logits too little to see."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=implementation, dtype=dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(QUERY_KEY_WEIGHTS):
                parameter.mul_(SHARPEN)
    return model.to(device)


def packing_error(model: torch.nn.Module, batch: dict, items: list[TokenizedExample],
                  reference: torch.nn.Module) -> float:
    """Largest |logit difference| between each sequence packed (in `model`) and alone (in `reference`)."""
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits.reshape(len(ROWS), -1, model.config.vocab_size)
        worst = 0.0
        for row_number, row in enumerate(ROWS):
            offset = 0
            for index in row:
                ids = torch.tensor([items[index].input_ids], device=reference.device)
                alone = reference(input_ids=ids, use_cache=False).logits[0].float()
                packed_part = packed[row_number, offset:offset + ids.shape[1]].float()
                worst = max(worst, (alone - packed_part).abs().max().item())
                offset += ids.shape[1]
    return worst


def packed_tensors(items: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """The rows as training collates them (position_ids restarting per sequence), without labels."""
    tensors = collate(ROWS, items, pad_id=0, max_length=128, packing=True)
    tensors.pop("labels")
    return tensors


def packed_batch(choice, items: list[TokenizedExample], *, device: str = "cpu",
                 mask_dtype: torch.dtype = torch.float32) -> dict:
    """The rows as the chosen attention gets them in training (block mask, flattened rows)."""
    tensors = {key: value.to(device) for key, value in packed_tensors(items).items()}
    return model_inputs(tensors, block_mask=choice.block_mask, flatten_rows=choice.flatten_rows,
                        mask_dtype=mask_dtype)
