"""Where one rank's forward+backward goes: torch.profiler over the benchmark's packed micro batches (not a test).

    .venv/bin/python benchmarks/step_profile.py [--work DIR] [--batches 2] [--compile]

The model and corpus of benchmarks/training_speed.py (5M Llama, hidden 256, packed rows of 512), 1 thread like a
rank, the chunked loss as deepfleet runs it on CPU. Prints the wall time of forward+backward per micro batch, the
profiler's self time by category (matmuls, attention, loss, everything else), the FLOP/s inside the matmul ops
against the fp32 1024^3 matmul peak measured here, and the time of an AdamW step over half the parameters (what
a ZeRO-2 rank of 2 updates).

With --baseline-src DIR (another checkout's src), instead times forward+backward of the same micro batches with
DIR's per-sequence attention and this checkout's, alternating in one process (a change before/after side by side,
robust to other load on the machine), eager and with --compile compiled too.

With --shapes, also prints the matmuls by input shape (time per micro batch and GFLOP/s), to compare them with the
same shapes timed alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_speed import MAX_LENGTH, MICRO_BATCH, write_corpus, write_model  # noqa: E402

from deepfleet.plan.recipe import DataSpec, ModelSpec  # noqa: E402
from deepfleet.train.batches import collate  # noqa: E402
from deepfleet.train.row_plan import plan_rows  # noqa: E402
from deepfleet.train.dataset import build_datasets  # noqa: E402
from deepfleet.train.flops import training_flops_of  # noqa: E402
from deepfleet.train.loss_head import LossChoice, model_loss  # noqa: E402
from deepfleet.train.packed_attention import PER_SEQUENCE  # noqa: E402
from deepfleet.train.tokenizer import load_tokenizer  # noqa: E402

BASELINE = "baseline_per_sequence"

CATEGORIES = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
              ("attention", ("scaled_dot_product", "flash_attention")),
              ("loss", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
              ("copies", ("aten::copy_", "aten::clone", "aten::contiguous")))


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other"


def matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * size ** 3 / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True) the model, as train.compile")
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds with --baseline-src")
    parser.add_argument("--shapes", action="store_true", help="also print the matmuls by input shape")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="df-profile-"))
    if not (work / "model").exists():
        write_corpus(work / "train.jsonl")
        write_model(work / "model")
    model_dir = str(work / "model")
    tokenizer = load_tokenizer(ModelSpec(name=model_dir))
    train, _, _ = build_datasets(DataSpec(train=[str(work / "train.jsonl")], format="text", max_length=MAX_LENGTH),
                                 tokenizer, seed=1)
    rows = plan_rows(train, max_length=MAX_LENGTH, packing=True, seed=1, epoch=0)
    batches = [collate(rows[i:i + MICRO_BATCH], train, pad_id=tokenizer.pad_token_id, max_length=MAX_LENGTH,
                       packing=True) for i in range(0, MICRO_BATCH * (args.batches + 2), MICRO_BATCH)]
    if args.baseline_src:
        compare(args, model_dir, batches)
        return
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=PER_SEQUENCE)
    model.train()
    call = torch.compile(model, dynamic=True) if args.compile else model
    choice = LossChoice(chunked=True, chunk_tokens=4096)
    counts = training_flops_of(model)

    def step(batch) -> None:
        tensors = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
        model_loss(call, model, choice, tensors, use_cache=False).loss.backward()

    for batch in batches[:2]:      # warm-up (and compile)
        step(batch)
    timed = batches[2:]
    started = time.perf_counter()
    for batch in timed:
        step(batch)
    wall = time.perf_counter() - started
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        for batch in timed:
            step(batch)
    shares: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    mm_flops = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        label = category(event.key)
        shares[label] += event.self_cpu_time_total / 1e6
        calls[label] += event.count
        if label == "matmul" and event.flops:
            mm_flops += event.flops
    profiled = sum(shares.values())
    peak = matmul_peak()
    tokens = sum(int((b["position_ids"] >= 0).sum()) for b in timed)
    real = sum(int((b["labels"] != -100).sum() + (b["position_ids"] == 0).sum()) for b in timed)
    model_flops = sum(counts.of_sequences(_lengths(b)) for b in timed)
    print(f"{'compiled' if args.compile else 'eager'}: {len(timed)} micro batches of {MICRO_BATCH} rows, "
          f"{tokens} row tokens (~{real} real); fwd+bwd {wall / len(timed):.3f} s per micro batch (unprofiled)")
    print(f"fp32 1024^3 matmul peak, 1 thread: {peak / 1e9:.1f} GFLOP/s")
    for label, seconds in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {label:24} {seconds / len(timed):7.3f} s  {100 * seconds / profiled:5.1f}%  ({calls[label]} calls)")
    mm_seconds = shares["matmul"]
    if mm_flops:
        print(f"  matmul ops: {mm_flops / mm_seconds / 1e9:.1f} GFLOP/s inside them = {100 * mm_flops / mm_seconds / peak:.0f}% "
              f"of peak; the matmuls alone at peak would take {mm_flops / peak / len(timed):.3f} s per micro batch")
    if model_flops:
        print(f"  MFU of fwd+bwd alone (unprofiled wall): {100 * model_flops / wall / peak:.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.shapes:
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if category(e.key) == "matmul" and e.flops]
        for event in sorted(by_shape, key=lambda e: -e.self_cpu_time_total):
            print(f"  {event.key:12} {str(event.input_shapes[:2]):36} {event.self_cpu_time_total / 1e3 / len(timed):7.2f} ms "
                  f"per micro batch, {event.flops / event.self_cpu_time_total / 1e3:6.1f} GFLOP/s")
    params = [p for p in model.parameters()]
    half = params[: len(params) // 2]
    for p in half:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(half, lr=1e-3)
    optimizer.step()
    started = time.perf_counter()
    for _ in range(5):
        optimizer.step()
    print(f"AdamW step over {sum(p.numel() for p in half):,} parameters: {(time.perf_counter() - started) / 5:.3f} s")


def compare(args, model_dir: str, batches: list) -> None:
    from transformers import AttentionInterface
    spec = importlib.util.spec_from_file_location(
        "baseline_packed_attention", args.baseline_src / "deepfleet" / "train" / "packed_attention.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)   # registers its function under PER_SEQUENCE: register both again
    AttentionInterface.register(BASELINE, baseline.per_sequence_attention)
    from deepfleet.train import packed_attention
    AttentionInterface.register(PER_SEQUENCE, packed_attention.per_sequence_attention)
    choice = LossChoice(chunked=True, chunk_tokens=4096)
    variants = {}
    for name in (BASELINE, PER_SEQUENCE):
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=name)
        model.train()
        variants[name] = (model, model)
        if args.compile:
            variants[name + " compiled"] = (model, torch.compile(model, dynamic=True))
    counts = training_flops_of(variants[PER_SEQUENCE][0])
    flops = sum(counts.of_sequences(_lengths(b)) for b in batches[2:])

    def run(model, call, batch_list) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        for batch in batch_list:
            tensors = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
            model_loss(call, model, choice, tensors, use_cache=False).loss.backward()
        return time.perf_counter() - started, torch.cat([p.grad.flatten() for p in model.parameters()])

    grads = {}
    for name, (model, call) in variants.items():
        model.zero_grad()
        run(model, call, batches[:2])       # warm-up and compile
        model.zero_grad()
        grads[name] = run(model, call, batches[2:])[1]
    for name in variants:
        print(f"{name}: max |grad - {BASELINE}'s| {(grads[name] - grads[BASELINE]).abs().max().item():.2e}")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(repeats=2))
        for name, (model, call) in variants.items():
            model.zero_grad()
            seconds[name].append(run(model, call, batches[2:])[0])
    peak = max(peaks)
    print(f"fp32 1024^3 matmul peak, 1 thread, between rounds: {min(peaks) / 1e9:.1f}..{peak / 1e9:.1f} GFLOP/s; "
          f"MFU of forward+backward against {peak / 1e9:.1f}")
    for name, values in seconds.items():
        best, median = min(values), statistics.median(values)
        print(f"  {name:32} median {median / (len(batches) - 2):.3f} s per micro batch, MFU median "
              f"{flops / median / peak:.1%}, best {flops / best / peak:.1%}")
    for new, old in ((PER_SEQUENCE, BASELINE), (PER_SEQUENCE + " compiled", BASELINE + " compiled")):
        if new in seconds:
            ratios = [o / n for o, n in zip(seconds[old], seconds[new])]
            print(f"  {new} / {old}: " + " ".join(f"{r:.2f}x" for r in ratios)
                  + f"; median {statistics.median(ratios):.2f}x")


def _lengths(batch) -> list[int]:
    from deepfleet.train.packed_attention import sequence_bounds
    out = []
    for row in batch["position_ids"]:
        out.extend(end - start for start, end in sequence_bounds(row))
    return out


if __name__ == "__main__":
    main()
