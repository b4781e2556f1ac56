"""Packed rows: one masked 512x512 sdpa per row vs causal sdpa per packed sequence, side by side (not a test).

    .venv/bin/python benchmarks/packed_attention.py --work DIR   # DIR from training_speed.py (model/, train.jsonl)

The profile of deepfleet's training step (benchmarks/RESULTS.md) puts ~22% of a rank's time in
aten::_scaled_dot_product_flash_attention (forward + backward): with packing, transformers turns
position_ids into a block-diagonal mask, and the CPU kernel computes every 512x512 block of every row.
This prototype registers an attention function that runs causal sdpa on each packed sequence only
(sum of L^2/2 instead of 512^2 per row), checks it gives the same logits, and times forward+backward
of the same packed micro batches with both, alternating, 1 thread. It is a proposal for
train/model.py (`attn_implementation`), measured here; deepfleet does not use it yet.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM

from deepfleet.plan.recipe import DataSpec, ModelSpec
from deepfleet.train.batches import collate, plan_rows
from deepfleet.train.dataset import build_datasets
from deepfleet.train.tokenizer import load_tokenizer


def sequence_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence in one row: position_ids restart at 0 at every start."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[-1]]))


def per_sequence_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                      **kwargs):
    """query/key/value [batch, heads, seq, dim] -> [batch, seq, heads, dim], causal within each sequence."""
    out = torch.empty_like(query)
    for row in range(query.shape[0]):
        for start, end in sequence_bounds(position_ids[row]):
            out[row:row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    AttentionInterface.register("per_sequence_sdpa", per_sequence_sdpa)
    model_dir = str(args.work / "model")
    tokenizer = load_tokenizer(ModelSpec(name=model_dir))
    train, _, _ = build_datasets(DataSpec(train=[str(args.work / "train.jsonl")], format="text", max_length=512),
                                 tokenizer, seed=1)
    rows = plan_rows(train, max_length=512, packing=True, seed=1, epoch=0)
    batches = [collate(rows[i:i + 4], train, pad_id=tokenizer.pad_token_id, max_length=512, packing=True)
               for i in range(0, 4 * (args.batches + 1), 4)]
    models = {name: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=name)
              for name in ("sdpa", "per_sequence_sdpa")}
    with torch.no_grad():
        logits = {name: m(**batches[0], use_cache=False).logits for name, m in models.items()}
    print(f"max |logit difference|: {(logits['sdpa'] - logits['per_sequence_sdpa']).abs().max().item():.2e}")
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches[1:]:
                model(**batch, use_cache=False).loss.backward()
            seconds[name].append(time.perf_counter() - started)
    tokens = sum(int(b["input_ids"].numel()) for b in batches[1:])
    for name, values in seconds.items():
        print(f"{name:18} " + " ".join(f"{tokens / v:7.0f}" for v in values) + " tok/s (fwd+bwd, 1 thread)")
    ratios = [a / b for a, b in zip(seconds["sdpa"], seconds["per_sequence_sdpa"])]
    print("per_sequence_sdpa / sdpa speed: " + " ".join(f"{r:.2f}x" for r in ratios)
          + f"; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
