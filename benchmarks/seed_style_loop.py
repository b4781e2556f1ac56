"""The reference loops deepfleet is measured against, one rank each under torchrun (run by training_speed.py).

    torchrun --nproc-per-node 2 benchmarks/seed_style_loop.py --mode max_length|dynamic --model-dir D
        --data train.jsonl --ds-config ds.json --steps 12 --warmup-steps 3 --out result.json

The seed documents' way: plain `deepspeed.initialize`, a DistributedSampler-style split of the
sequences, each micro batch padded either to max_length (`max_length`) or to its longest sequence
(`dynamic`), attention_mask for the padding, pad labels = -100. Timing matches deepfleet's
metrics.jsonl: from fetching the first micro batch of a step to the end of engine.step(), slowest
rank; real tokens are the non-pad tokens of every rank, and model FLOPs their standard count
(`deepfleet.train.flops`, the function deepfleet's metrics use).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.distributed as dist


def load_sequences(path: str, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each text, with the closing eos, cut to max_length (as deepfleet's text format does)."""
    sequences = []
    with open(path) as handle:
        for line in handle:
            ids = list(tokenizer(json.loads(line)["text"], add_special_tokens=True)["input_ids"])
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids.append(tokenizer.eos_token_id)
            sequences.append(ids[:max_length])
    return sequences


def collate(batch: list[list[int]], *, pad_id: int, width: int) -> dict[str, torch.Tensor]:
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["max_length", "dynamic"], required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepfleet.train.flops import training_flops_of

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = json.load(open(args.ds_config))
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    sequences = load_sequences(args.data, tokenizer, args.max_length)
    order = list(range(len(sequences)))
    random.Random(args.seed).shuffle(order)
    mine = order[rank::world]                          # DistributedSampler's split
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    counts = training_flops_of(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.train()
    pad_id = tokenizer.pad_token_id
    cursor, timed_tokens, timed_flops, timed_seconds, losses = 0, 0.0, 0.0, 0.0, []
    for step in range(args.steps):
        started = time.perf_counter()
        real, flops = 0, 0.0
        for _ in range(accum):
            batch = [sequences[i] for i in mine[cursor:cursor + micro]]
            cursor += micro
            width = args.max_length if args.mode == "max_length" else max(len(ids) for ids in batch)
            tensors = collate(batch, pad_id=pad_id, width=width)
            loss = engine(**tensors).loss
            engine.backward(loss)
            engine.step()
            real += int(tensors["attention_mask"].sum())
            flops += counts.of_sequences(len(ids) for ids in batch)   # padding costs time, not model FLOPs
            losses.append(loss.item())
        seconds = time.perf_counter() - started
        stats = torch.tensor([seconds, float(real), flops], dtype=torch.float64)
        slowest = stats.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        if step >= args.warmup_steps:
            timed_seconds += slowest[0].item()
            timed_tokens += stats[1].item()
            timed_flops += stats[2].item()
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        json.dump({"mode": args.mode, "tokens": timed_tokens, "seconds": timed_seconds,
                   "tokens_per_second": timed_tokens / timed_seconds, "n_params": n_params,
                   "flops_per_second": timed_flops / timed_seconds,
                   "timed_steps": args.steps - args.warmup_steps, "last_loss": losses[-1]}, open(args.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
