"""deepfleet training vs the seed-style loops, side by side in one run on this machine (not a test).

    .venv/bin/python benchmarks/training_speed.py [--rounds 2] [--steps 12] [--warmup-steps 3]

Same model (a ~5M-parameter Llama built from a config), same data (texts with lognormal lengths
clipped to 16..512 tokens), same 2 CPU ranks with OMP_NUM_THREADS=1 each, same DeepSpeed config
(deepfleet's for the recipe: ZeRO-2, AdamW, fp32), same micro batch and accumulation. Each round
runs, in turn:
  deepfleet     `deepfleet train RECIPE --nproc 2`: packed rows of 512, real tokens/s from metrics.jsonl
  max_length    benchmarks/seed_style_loop.py: every sequence padded to 512 (the seeds' loop)
  dynamic       the same loop, each micro batch padded to its longest sequence
and the machine's fp32 matmul peak is measured (2 processes x 1 thread, like the ranks) before the first run and
after every run: each run's MFU is over the higher of the peaks measured just before and just after it (this VM's
peak drifts by up to 10% within minutes, so one peak for the whole benchmark would skew runs made far from it).
With --compare-block-mask, deepfleet also runs with `model.attn_implementation: sdpa` (packed rows
through transformers' block-diagonal mask instead of per-sequence attention), to show what that moved.
With --compare-chunked-loss, deepfleet also runs with `train.chunked_loss: false` (the model's own loss on
full logits; the deepfleet row uses the recipe default, auto, which is the chunked loss on CPU).
With --baseline-src DIR, the deepfleet rows (eager, and compiled with --compare-compile) also run with deepfleet
imported from DIR (another checkout's src), to measure a change before/after side by side.
With --compare-zero-auto, deepfleet also runs with `deepspeed.zero: auto` (the planner's stage; ZeRO-0 for this model,
which reduces gradients once per step where ZeRO-2 does on each micro batch), compiled with --compare-compile; the
seed-style loops keep the guides' ZeRO-2.
With --compare-attention-free, deepfleet also runs (compiled with --compare-compile) from a copy of its src whose
per-sequence attention costs nothing: it returns the values, and q, k and v still get (zero) gradients, so every
projection's backward runs. The FLOP count is unchanged, so its MFU is the ceiling that no attention kernel can pass
on this model and machine.
With --compare-compile, every deepfleet row runs with `train.compile: false` (eager) and deepfleet also runs with
`train.compile: true` (and, with --compare-chunked-loss, compiled with the plain loss too). The compiled rows'
first steps include the compile time: it is printed from their first step's time against the eager run's.
Prints (a) deepfleet / max_length, (b) deepfleet / dynamic, (c) MFU = model FLOPs/s over the peak, per
round and as the median over rounds. Model FLOPs are the standard count of `deepfleet.train.flops`
(6 x matmul parameters per token plus causal attention per real sequence): deepfleet records them in
metrics.jsonl, the seed-style loops count their own batches with the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEEPFLEET = str(Path(sys.executable).with_name("deepfleet"))
MAX_LENGTH = 512
MIN_LENGTH = 16
LENGTH_MEDIAN = 100            # lognormal(ln 100, 0.8): median 100 tokens, a long tail to 512
LENGTH_SIGMA = 0.8
N_TEXTS = 6000
MICRO_BATCH = 4
GRAD_ACCUM = 2
RANKS = 2
HIDDEN, LAYERS, INTERMEDIATE, HEADS = 256, 5, 1024, 4
BLOCK_MASK = "deepfleet sdpa mask"
PLAIN_LOSS = "deepfleet plain loss"
COMPILED = "deepfleet compiled"
ZERO_AUTO = "deepfleet zero auto"
ATTENTION_FREE = "attention free"
COMPILED_PLAIN_LOSS = "deepfleet compiled, plain loss"
BASELINE = "baseline eager"
BASELINE_COMPILED = "baseline compiled"
WORDS = ["the", "model", "of", "a", "fleet", "trains", "on", "every", "host", "and", "data", "flows", "to",
         "rank", "zero", "while", "gradients", "reduce", "across", "links"]


def machine_description() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def write_corpus(path: Path, seed: int = 0) -> list[int]:
    """Texts whose token count (chars + eos with the char-level tokenizer) is lognormal, clipped to 16..512."""
    rng = random.Random(seed)
    lengths = []
    with path.open("w") as handle:
        for _ in range(N_TEXTS):
            n = min(MAX_LENGTH, max(MIN_LENGTH, round(rng.lognormvariate(math.log(LENGTH_MEDIAN), LENGTH_SIGMA))))
            words, text = [], ""
            while len(text) < n - 1:
                words.append(rng.choice(WORDS))
                text = " ".join(words)
            handle.write(json.dumps({"text": text[:n - 1]}) + "\n")
            lengths.append(n)
    return lengths


def write_model(directory: Path):
    """A ~5M-parameter Llama with deepfleet's character tokenizer, saved as a local HF model dir.

    Returns its parameter count and its FLOP counts (`TrainingFlops`)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from deepfleet.plan.recipe import ModelSpec
    from deepfleet.train.flops import training_flops_of
    from deepfleet.train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=MAX_LENGTH, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), training_flops_of(model)


def recipe_for(work: Path, model_dir: Path, data: Path, steps: int, output: str) -> dict:
    return {"model": str(model_dir), "method": "full",
            "data": {"train": [str(data)], "format": "text", "max_length": MAX_LENGTH, "packing": True},
            "train": {"max_steps": steps, "global_batch": MICRO_BATCH * GRAD_ACCUM * RANKS,
                      "micro_batch": MICRO_BATCH, "lr": 1e-3, "warmup": 1, "seed": 1},
            "precision": "fp32", "deepspeed": {"zero": 2},
            "logging": {"tensorboard": False, "every_steps": 1, "peak_tflops": 1.0},
            "output_dir": str(work / output), "resume": False}


def deepspeed_config(recipe: dict, steps: int) -> dict:
    from deepfleet.plan.deepspeed_config import deepspeed_config_for_run
    from deepfleet.plan.recipe import Recipe
    return deepspeed_config_for_run(Recipe.model_validate(recipe), world_size=RANKS, total_steps=steps,
                                    accelerator="cpu", bf16_supported=False)


def rank_env(source: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if source is not None:     # deepfleet imported from another checkout's src (the --baseline-src rows)
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_deepfleet(work: Path, recipe: dict, warmup_steps: int, tag: str, source: Path | None = None) -> dict:
    import yaml
    recipe = {**recipe, "output_dir": str(work / tag)}
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run([DEEPFLEET, "train", str(path), "--nproc", str(RANKS)], cwd=work, env=rank_env(source),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"deepfleet train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / tag / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r.get("kind") == "train" and r["step"] > warmup_steps]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["step_seconds"] for r in timed)
    flops = sum(r["model_flops"] for r in timed)
    train = [r for r in records if r.get("kind") == "train"]
    planned = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if "deepspeed: auto ->" in line]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "flops_per_second": flops / seconds, "timed_steps": len(timed), "last_loss": timed[-1]["loss"],
            "first_step_seconds": train[0]["step_seconds"], "recompiles": train[-1].get("recompiles"),
            "planned": planned[0].strip() if planned else None}


# Appended to a copy of packed_attention.py by --compare-attention-free: registered under the same name, it replaces
# deepfleet's per-sequence attention, graph break included.
FREE_ATTENTION_SOURCE = """

@torch.compiler.disable
def per_sequence_attention(module, query, key, value, attention_mask, **kwargs):
    return (value + 0 * (query + key)).transpose(1, 2), None


AttentionInterface.register(PER_SEQUENCE, per_sequence_attention)
"""


def attention_free_src(work: Path) -> Path:
    """A copy of deepfleet's src with FREE_ATTENTION_SOURCE appended to its packed attention module."""
    source = work / "attention-free-src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(REPO / "src", source, ignore=shutil.ignore_patterns("__pycache__"))
    module = source / "deepfleet" / "train" / "packed_attention.py"
    module.write_text(module.read_text() + FREE_ATTENTION_SOURCE)
    return source


def run_seed_loop(work: Path, mode: str, model_dir: Path, data: Path, ds_config: Path, steps: int,
                  warmup_steps: int, tag: str) -> dict:
    out = work / f"{tag}.json"
    argv = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
            str(REPO / "benchmarks" / "seed_style_loop.py"), "--mode", mode, "--model-dir", str(model_dir),
            "--data", str(data), "--ds-config", str(ds_config), "--max-length", str(MAX_LENGTH),
            "--steps", str(steps), "--warmup-steps", str(warmup_steps), "--out", str(out)]
    done = subprocess.run(argv, cwd=work, env=rank_env(), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"seed-style loop ({mode}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def _matmul_flops(size: int, seconds: float, queue) -> None:
    import torch
    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.matmul(a, b)
        count += 1
    queue.put(2.0 * size ** 3 * count / elapsed)


def measure_machine_peak(*, size: int = 1024, seconds: float = 3.0, repeats: int = 3) -> float:
    """fp32 matmul FLOP/s of the machine: RANKS single-thread processes at once, best of `repeats`."""
    context = multiprocessing.get_context("spawn")
    best = 0.0
    for _ in range(repeats):
        queue = context.Queue()
        workers = [context.Process(target=_matmul_flops, args=(size, seconds, queue)) for _ in range(RANKS)]
        for worker in workers:
            worker.start()
        total = sum(queue.get(timeout=120) for _ in workers)
        for worker in workers:
            worker.join(timeout=30)
        best = max(best, total)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--compare-block-mask", action="store_true",
                        help="also run deepfleet with sdpa's block-diagonal mask for packed rows")
    parser.add_argument("--compare-chunked-loss", action="store_true",
                        help="also run deepfleet with train.chunked_loss: false")
    parser.add_argument("--compare-compile", action="store_true",
                        help="run deepfleet eager (train.compile: false) and compiled (true)")
    parser.add_argument("--compare-zero-auto", action="store_true",
                        help="also run deepfleet with deepspeed.zero: auto (the planner's choice)")
    parser.add_argument("--compare-attention-free", action="store_true",
                        help="also run deepfleet with attention that costs nothing: the MFU ceiling on this model")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also run the deepfleet rows with deepfleet imported from this src dir (another "
                             "checkout: before/after a change, side by side)")
    parser.add_argument("--no-seed-loops", action="store_true", help="skip the seed-style loops (and ratios a, b)")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="df-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_description()}")
    lengths = write_corpus(work / "train.jsonl")
    n_params, counts = write_model(work / "model")
    mean_length = statistics.mean(lengths)
    attention_share = counts.of_sequences(lengths) / (6 * counts.trainable_matmul_params * sum(lengths)) - 1
    print(f"model: Llama {HIDDEN}x{LAYERS} layers, {n_params:,} params, {counts.trainable_matmul_params:,} in "
          f"matmuls; causal attention adds {attention_share:.1%} to 6N FLOPs on this corpus")
    print(f"corpus: {N_TEXTS} texts, lognormal lengths "
          f"(median {LENGTH_MEDIAN}, sigma {LENGTH_SIGMA}) clipped to {MIN_LENGTH}..{MAX_LENGTH}: mean "
          f"{mean_length:.0f} tokens, so padding to {MAX_LENGTH} wastes {1 - mean_length / MAX_LENGTH:.0%}")
    print(f"{RANKS} CPU ranks x 1 thread, ZeRO-2 fp32, micro batch {MICRO_BATCH} x accumulation {GRAD_ACCUM}, "
          f"{args.steps} steps per run, first {args.warmup_steps} not timed; work dir {work}")
    recipe = recipe_for(work, work / "model", work / "train.jsonl", args.steps, "deepfleet")
    if args.compare_compile:
        recipe["train"]["compile"] = False
    ds_path = work / "ds_config.json"
    ds_path.write_text(json.dumps(deepspeed_config(recipe, args.steps), indent=2))
    peaks = [measure_machine_peak()]

    def measured(result: dict) -> dict:
        """The run's result with the peak it is counted against: the higher of those just before and after it."""
        peaks.append(measure_machine_peak())
        return {**result, "peak": max(peaks[-2:])}

    rounds = []
    for index in range(args.rounds):
        result = {"deepfleet": measured(run_deepfleet(work, recipe, args.warmup_steps, f"deepfleet-{index}"))}
        if args.compare_block_mask:
            masked = {**recipe, "model": {"name": recipe["model"], "attn_implementation": "sdpa"}}
            result[BLOCK_MASK] = measured(run_deepfleet(work, masked, args.warmup_steps, f"block-mask-{index}"))
        if args.compare_chunked_loss:
            plain = {**recipe, "train": {**recipe["train"], "chunked_loss": False}}
            result[PLAIN_LOSS] = measured(run_deepfleet(work, plain, args.warmup_steps, f"plain-loss-{index}"))
        if args.compare_compile:
            compiled = {**recipe, "train": {**recipe["train"], "compile": True}}
            result[COMPILED] = measured(run_deepfleet(work, compiled, args.warmup_steps, f"compiled-{index}"))
            if args.compare_chunked_loss:
                plain = {**compiled, "train": {**compiled["train"], "chunked_loss": False}}
                result[COMPILED_PLAIN_LOSS] = measured(run_deepfleet(work, plain, args.warmup_steps,
                                                                     f"compiled-plain-{index}"))
        if args.compare_zero_auto:
            planned = {**recipe, "deepspeed": {"zero": "auto"}}
            if args.compare_compile:
                planned["train"] = {**recipe["train"], "compile": True}
            result[ZERO_AUTO] = measured(run_deepfleet(work, planned, args.warmup_steps, f"zero-auto-{index}"))
        if args.compare_attention_free:
            free = {**recipe, "train": {**recipe["train"], "compile": True}} if args.compare_compile else recipe
            result[ATTENTION_FREE] = measured(run_deepfleet(work, free, args.warmup_steps, f"attention-free-{index}",
                                                            attention_free_src(work)))
        if args.baseline_src:
            result[BASELINE] = measured(run_deepfleet(work, recipe, args.warmup_steps, f"baseline-{index}",
                                                      args.baseline_src))
            if args.compare_compile:
                compiled = {**recipe, "train": {**recipe["train"], "compile": True}}
                result[BASELINE_COMPILED] = measured(run_deepfleet(work, compiled, args.warmup_steps,
                                                                   f"baseline-compiled-{index}", args.baseline_src))
        for mode in () if args.no_seed_loops else ("max_length", "dynamic"):
            result[mode] = measured(run_seed_loop(work, mode, work / "model", work / "train.jsonl", ds_path,
                                                  args.steps, args.warmup_steps, f"{mode}-{index}"))
        rounds.append(result)
        print(f"round {index + 1}: " + ", ".join(f"{name} {r['tokens_per_second']:,.0f} tok/s"
                                                 for name, r in result.items()), flush=True)
    report(rounds, peaks=peaks)


def report(rounds: list[dict], *, peaks: list[float]) -> None:
    seeds = "max_length" in rounds[0]
    ratio_a = [r["deepfleet"]["tokens_per_second"] / r["max_length"]["tokens_per_second"] for r in rounds] if seeds else []
    ratio_b = [r["deepfleet"]["tokens_per_second"] / r["dynamic"]["tokens_per_second"] for r in rounds] if seeds else []
    names = list(rounds[0])
    mfu = {name: [r[name]["flops_per_second"] / r[name]["peak"] for r in rounds] for name in names}
    print(f"\nmachine fp32 matmul peak ({RANKS} x 1 thread, 1024^3) before the first run and after each: "
          + ", ".join(f"{p / 1e9:.0f}" for p in peaks) + " GFLOP/s; each run's MFU is over the higher of its two")
    print(f"{'':28}" + "".join(f"{'round ' + str(i + 1):>12}" for i in range(len(rounds))) + f"{'median':>12}")
    for name in names:
        values = [r[name]["tokens_per_second"] for r in rounds]
        print(f"{name + ' real tok/s':28}" + "".join(f"{v:>12,.0f}" for v in values) + f"{statistics.median(values):>12,.0f}")
    for label, values, goal in (("(a) deepfleet / max_length", ratio_a, "goal >= 3.0x"),
                                ("(b) deepfleet / dynamic", ratio_b, "goal >= 1.7x")):
        if not values:
            continue
        print(f"{label:28}" + "".join(f"{v:>11.2f}x" for v in values) + f"{statistics.median(values):>11.2f}x  {goal}")
    if BLOCK_MASK in names:
        values = [r["deepfleet"]["tokens_per_second"] / r[BLOCK_MASK]["tokens_per_second"] for r in rounds]
        print(f"{'per-sequence / sdpa mask':28}" + "".join(f"{v:>11.2f}x" for v in values)
              + f"{statistics.median(values):>11.2f}x")
    if PLAIN_LOSS in names:
        values = [r["deepfleet"]["tokens_per_second"] / r[PLAIN_LOSS]["tokens_per_second"] for r in rounds]
        print(f"{'chunked / plain loss':28}" + "".join(f"{v:>11.2f}x" for v in values)
              + f"{statistics.median(values):>11.2f}x")
    for new, old in (("deepfleet", BASELINE), (COMPILED, BASELINE_COMPILED)):
        if new in names and old in names:
            values = [r[new]["tokens_per_second"] / r[old]["tokens_per_second"] for r in rounds]
            print(f"{new + ' / baseline':28}" + "".join(f"{v:>11.2f}x" for v in values)
                  + f"{statistics.median(values):>11.2f}x")
    for compiled, eager in ((COMPILED, "deepfleet"), (COMPILED_PLAIN_LOSS, PLAIN_LOSS)):
        if compiled in names and eager in names:
            values = [r[compiled]["tokens_per_second"] / r[eager]["tokens_per_second"] for r in rounds]
            print(f"{compiled + ' / eager':28}" + "".join(f"{v:>11.2f}x" for v in values)
                  + f"{statistics.median(values):>11.2f}x")
            extra = [r[compiled]["first_step_seconds"] - r[eager]["first_step_seconds"] for r in rounds]
            print(f"{'    compile time (s)':28}" + "".join(f"{v:>12.1f}" for v in extra)
                  + f"{statistics.median(extra):>12.1f}  (first step, compiled - eager)")
            print(f"{'    recompiles':28}" + "".join(f"{r[compiled]['recompiles']:>12}" for r in rounds))
    for name in names:
        if rounds[0][name].get("planned"):
            print(f"{name}: {rounds[0][name]['planned']}")
    for name, values in mfu.items():
        label = f"(c) MFU {name}" if name == "deepfleet" else f"    MFU {name}"
        goal = "  goal >= 60%" if name in ("deepfleet", COMPILED, ZERO_AUTO) else ""
        print(f"{label:28}" + "".join(f"{v:>12.1%}" for v in values) + f"{statistics.median(values):>12.1%}{goal}")


if __name__ == "__main__":
    main()
