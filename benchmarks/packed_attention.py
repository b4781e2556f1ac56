"""Packed rows: one masked row x row sdpa per row vs deepfleet's per-sequence causal sdpa, side by side (not a test).

    .venv/bin/python benchmarks/packed_attention.py --work DIR   # DIR from training_speed.py (model/, train.jsonl)

With packing, transformers' sdpa turns position_ids into a block-diagonal mask and computes every
full row x row block; deepfleet's `train/packed_attention.py` runs causal sdpa on each packed sequence
only. This checks both give the same logits and times forward+backward of the same packed micro
batches with each, alternating, 1 thread, after one untimed round of each. `--row-length 2048`
shows the gain growing with the row (RESULTS.md: 1.06x at 512, 1.65x at 2048).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deepfleet.plan.recipe import DataSpec, ModelSpec
from deepfleet.train.batches import collate, plan_rows
from deepfleet.train.dataset import build_datasets
from deepfleet.train.packed_attention import PER_SEQUENCE
from deepfleet.train.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--row-length", type=int, default=512, help="packed row length (data.max_length)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = str(args.work / "model")
    tokenizer = load_tokenizer(ModelSpec(name=model_dir))
    train, _, _ = build_datasets(DataSpec(train=[str(args.work / "train.jsonl")], format="text",
                                          max_length=args.row_length),
                                 tokenizer, seed=1)
    rows = plan_rows(train, max_length=args.row_length, packing=True, seed=1, epoch=0)
    batches = [collate(rows[i:i + 4], train, pad_id=tokenizer.pad_token_id, max_length=args.row_length, packing=True)
               for i in range(0, 4 * (args.batches + 1), 4)]
    models = {name: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=name)
              for name in ("sdpa", PER_SEQUENCE)}
    with torch.no_grad():
        logits = {name: m(**batches[0], use_cache=False).logits for name, m in models.items()}
    print(f"max |logit difference|: {(logits['sdpa'] - logits[PER_SEQUENCE]).abs().max().item():.2e}")
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.rounds + 1):
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches[1:]:
                model(**batch, use_cache=False).loss.backward()
            if round_index:   # round 0 warms both up
                seconds[name].append(time.perf_counter() - started)
    tokens = sum(int(b["input_ids"].numel()) for b in batches[1:])
    for name, values in seconds.items():
        print(f"{name:22} " + " ".join(f"{tokens / v:7.0f}" for v in values) + " tok/s (fwd+bwd, 1 thread)")
    ratios = [a / b for a, b in zip(seconds["sdpa"], seconds[PER_SEQUENCE])]
    print("per-sequence / sdpa speed: " + " ".join(f"{r:.2f}x" for r in ratios)
          + f"; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
