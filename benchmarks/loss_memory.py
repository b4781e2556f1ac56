"""Plain against chunked cross-entropy at Qwen2.5's vocabulary: peak memory and speed of forward+backward (not a test).

    .venv/bin/python benchmarks/loss_memory.py [--tokens 4096] [--steps 2] [--layers 2] [--device cpu]

A Qwen2-shaped model built from a config (Qwen2.5-0.5B's widths: hidden 896, 14 heads, 2 KV heads, MLP 4864,
vocabulary 152,064, tied embeddings; `--layers` of them), fp32 on CPU (bf16 on CUDA), one row of `--tokens`
tokens (4,096 per rank), labels with the first tenth ignored (a prompt). Each variant runs in a fresh
process, one warm-up step then `--steps` timed forward+backward steps, through deepfleet's own `model_loss`:
  body     the decoder alone, loss = mean of the last hidden states squared: no output layer, no cross-entropy
  plain    the model's own loss (train.chunked_loss: false): full [tokens x vocab] logits
  chunked  the chunked loss (train.chunked_loss: true)
Peak memory is the process's peak RSS (ru_maxrss; on CUDA torch.cuda.max_memory_allocated). The loss's
share of peak memory is a variant's peak minus the body's peak: everything the output layer and the
cross-entropy add on top of the same model, inputs and decoder activations. Speed is tokens/s over the
timed steps and MFU by the standard count (deepfleet.train.flops) over the machine's fp32 matmul peak,
measured in one process with the same threads as the variants (CPU), before and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_speed import machine_description  # noqa: E402

VOCAB = 152_064
VARIANTS = ("body", "plain", "chunked")


def qwen_config(layers: int):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def run_variant(variant: str, *, tokens: int, steps: int, layers: int, device: str) -> dict:
    """In this (fresh) process: build, one warm-up step, `steps` timed steps; peak memory and timings."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepfleet.train.flops import training_flops_of
    from deepfleet.train.loss_head import choose_loss, model_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = qwen_config(layers)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).train()
    ids = torch.randint(3, VOCAB, (1, tokens), device=device)
    labels = ids.clone()
    labels[:, : tokens // 10] = -100
    choice = choose_loss(model, requested=variant == "chunked", device_type="cpu")
    assert choice.chunked == (variant == "chunked"), choice.describe()

    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if variant == "body":
            loss = model.model(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean()
        else:
            loss = model_loss(model, model, choice, {"input_ids": ids, "labels": labels}, use_cache=False).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, float(loss)

    step()
    timed = [step() for _ in range(steps)]
    seconds = [s for s, _ in timed]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    flops = training_flops_of(model, config).of_sequences([tokens])
    return {"variant": variant, "peak_bytes": peak, "step_seconds": statistics.median(seconds),
            "tokens_per_second": tokens / statistics.median(seconds), "model_flops": flops,
            "loss": timed[-1][1], "describe": choice.describe() if variant != "body" else "no output layer"}


def machine_peak(threads: int) -> float:
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 3.0:
            torch.matmul(a, b)
            count += 1
        best = max(best, 2.0 * 1024 ** 3 * count / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)   # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, tokens=args.tokens, steps=args.steps, layers=args.layers,
                                     device=args.device)))
        return
    import torch
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_description()}; "
          f"{torch.get_num_threads()} threads")
    print(f"Qwen2-shaped, {args.layers} layers x 896, vocabulary {VOCAB:,}, {args.tokens:,} tokens, "
          f"{'fp32 on CPU' if args.device == 'cpu' else 'bf16 on CUDA'}, {args.steps} timed steps per variant")
    peaks = [machine_peak(torch.get_num_threads())] if args.device == "cpu" else []
    results = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                               "--steps", str(args.steps), "--layers", str(args.layers), "--device", args.device],
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {variant}: {results[variant]}", flush=True)
    if args.device == "cpu":
        peaks.append(machine_peak(torch.get_num_threads()))
    report(results, peak=max(peaks) if peaks else None, peaks=peaks)


def report(results: dict, *, peak: float | None, peaks: list[float]) -> None:
    body = results["body"]["peak_bytes"]
    gib = 2 ** 30
    print(f"\n{'':10}{'peak':>10}{'loss share':>12}{'step s':>9}{'tok/s':>9}{'MFU':>8}  loss")
    for name, r in results.items():
        share = "" if name == "body" else f"{(r['peak_bytes'] - body) / gib:>9.2f} GiB"
        mfu = f"{r['model_flops'] / r['step_seconds'] / peak:>8.1%}" if peak and name != "body" else f"{'':>8}"
        print(f"{name:10}{r['peak_bytes'] / gib:>6.2f} GiB{share:>12}{r['step_seconds']:>9.2f}"
              f"{r['tokens_per_second']:>9,.0f}{mfu}  {r['loss']:.6f}")
    plain, chunked = (results[n]["peak_bytes"] - body for n in ("plain", "chunked"))
    print(f"loss share of peak memory, plain / chunked: {plain / chunked:.1f}x (goal >= 4x)")
    print(f"speed, chunked / plain: {results['plain']['step_seconds'] / results['chunked']['step_seconds']:.3f}x "
          f"(tokens/s; >= 1 keeps train.chunked_loss: auto on)")
    print(f"|plain loss - chunked loss| = {abs(results['plain']['loss'] - results['chunked']['loss']):.2e}")
    if peaks:
        print("machine fp32 matmul peak (1024^3, this process's threads): "
              + " / ".join(f"{p / 1e9:.1f}" for p in peaks) + f" GFLOP/s (before / after); MFU uses {peak / 1e9:.1f}")


if __name__ == "__main__":
    main()
