"""`train.compile`: the model compiled through DeepSpeed's engine (`engine.compile`, torch.compile with inductor).

`engine.compile()` compiles the whole module the engine wraps (DeepSpeed's ZeRO-3 parameter hooks are
excluded from the graphs by DeepSpeed itself). Two pieces of deepfleet's own stay eager, each a graph
break: the per-sequence attention of packed rows (its Python loop over the sequences of a row would
otherwise specialise on every row's sequence boundaries and recompile for each) and the chunked loss
(a Python loop over chunks with its gradients formed in the forward). Both are excluded where they are
defined (`packed_attention.py`, `chunked_loss.py`).

Rows vary in length (each micro batch is padded to its longest row), so the graphs are compiled with
dynamic shapes from the start (`dynamic=True`): one graph serves every row length. Left to its default
(static first, symbolic from the second length on), dynamo compiled the built-in Llama's frames again at
the second length: 52 compiles instead of 40, and a first step of 47 s instead of 23 s. What still
recompiles (validation's no-grad forward, a batch of one row, transformers' wrappers shared by several
classes) is counted as `recompiles` in metrics.jsonl: the compiles dynamo records with the guard failure
that made a compiled function compile again.

The backward graphs are compiled with the forward (`force_non_lazy_backward_lowering`), so every
compile failure surfaces in a forward, before a gradient exists: the micro batch is then run again
eager. `auto` trains eager from then on, and rank 0 says so in one warning line with every rank's cause (a rank
can fail alone: a missing compiler on one host); `true` stops with one error line (the user asked for the
compiled model, and a silent eager run would make its speed figures wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Sequence, TypeVar, Union

import torch

from deepfleet.errors import DeepfleetError, exception_summary

CompileSetting = Union[Literal["auto"], bool]
Result = TypeVar("Result")

# Recorded facts (benchmarks/RESULTS.md, "Compiled model", 2026-12-02, 2 CPU ranks, ZeRO-2, fp32). The 5M Llama of
# benchmarks/training_speed.py (hidden size 256): a compiled step ~1.1x faster, ~0.17 s less per step of ~4k tokens
# per rank, for ~30 s of compiling (cold inductor cache; ~7 s warm), so it pays after ~180 steps. The built-in
# tiny Llama (hidden size 96): no step faster (the graph breaks' and guards' overhead eats the fused kernels),
# ~24 s of compiling.
CPU_MIN_HIDDEN_FOR_COMPILE = 256
CPU_MIN_STEPS_FOR_COMPILE = 200
# ZeRO stages where the compiled model was run and its losses checked against eager, within 1.2e-7 over 5 steps of
# the built-in Llama. ZeRO-3 gave the same losses too, but its parameter hooks are graph breaks around every
# module: 33 recompiles, and steps slower than eager (0.12 vs 0.09 s).
STAGES_CHECKED = (0, 1, 2)
# LoRA was not measured faster compiled, and its dropout draws other random masks compiled than eager (so its
# losses differ from eager's by more than rounding: 4e-4 over 5 steps at dropout 0.05).
METHODS_CHECKED = ("full",)


@dataclass(frozen=True, kw_only=True)
class CompileChoice:
    compiled: bool
    why: str          # why eager, or why compiled under auto

    def describe(self) -> str:
        return f"compiled (torch.compile, inductor; {self.why})" if self.compiled else f"eager ({self.why})"


def choose_compile(setting: CompileSetting, *, device_type: str, zero_stage: int, method: str, total_steps: int,
                   hidden_size: int) -> CompileChoice:
    """`train.compile` for this run. auto compiles only where compiling was measured faster (CPU, full fine-tuning
    of models at least as wide as the benchmark's), for runs long enough to pay for the compile time, at a ZeRO
    stage where the compiled model was checked; true always; false never."""
    if setting is False:
        return CompileChoice(compiled=False, why="train.compile: false")
    if setting is True:
        return CompileChoice(compiled=True, why="train.compile: true")
    auto = "train.compile: auto"
    if device_type != "cpu":
        return CompileChoice(compiled=False,
                             why=f"{auto} compiles only where measured faster, not yet on {device_type}")
    if hidden_size < CPU_MIN_HIDDEN_FOR_COMPILE:
        return CompileChoice(compiled=False, why=f"{auto}: hidden size {hidden_size} < {CPU_MIN_HIDDEN_FOR_COMPILE}, "
                                                 f"where compiling was not measured faster on CPU")
    if method not in METHODS_CHECKED:
        return CompileChoice(compiled=False, why=f"{auto} does not compile {method}, not measured faster")
    if zero_stage not in STAGES_CHECKED:
        return CompileChoice(compiled=False, why=f"{auto} does not compile under ZeRO-{zero_stage}, "
                                                 f"not measured faster there")
    if total_steps < CPU_MIN_STEPS_FOR_COMPILE:
        return CompileChoice(compiled=False, why=f"{auto}: {total_steps} steps < {CPU_MIN_STEPS_FOR_COMPILE}, "
                                                 f"too few to pay for the compile time")
    return CompileChoice(compiled=True, why=f"{auto}: {total_steps} steps on CPU")


# Dynamo keeps a record of each compile (64 by default), with the guard failure that made it a recompile.
COMPILE_RECORDS_KEPT = 1_000_000


def _recompiles_so_far() -> int:
    from torch._dynamo import utils as dynamo_utils
    return sum(1 for record in dynamo_utils.get_compilation_metrics() if record.recompile_reason)


@dataclass(kw_only=True)
class CompiledModel:
    """The choice for a run, applied to its engine: counts recompiles and falls back to eager when compiling fails."""
    choice: CompileChoice
    requested: CompileSetting
    fallback: str = ""                  # the cause, once compiling failed and the run went eager
    _recompiles_before: int = field(default=0, repr=False)
    _ranks_reported: frozenset[int] = field(default=frozenset(), repr=False)

    @property
    def active(self) -> bool:
        return self.choice.compiled and not self.fallback

    @property
    def recompiles(self) -> int | None:
        """Recompiles since this model was compiled; None when it never was."""
        return _recompiles_so_far() - self._recompiles_before if self.choice.compiled else None

    def describe(self) -> str:
        return f"eager (compiling failed: {self.fallback})" if self.fallback else self.choice.describe()

    def run(self, forward: Callable[[], Result]) -> Result:
        """`forward()`, and when compiling it fails, `forward()` again eager (auto) or one error line (true)."""
        if not self.active:
            return forward()
        try:
            return forward()
        except torch._dynamo.exc.TorchDynamoException as exc:
            self._fall_back(exc)
        return forward()

    def _fall_back(self, exc: BaseException) -> None:
        cause = exception_summary(_root_cause(exc))
        if self.requested is True:
            raise DeepfleetError(f"compiling the model failed: {cause}", where="train.compile",
                                 fix="set train.compile: auto (falls back to eager) or false") from None
        torch.compiler.set_stance("force_eager")
        self.fallback = cause

    def newly_fallen_back(self, fell_back: Sequence[bool]) -> frozenset[int]:
        """The ranks that fell back since the last call, given every rank's `bool(fallback)` (the same list on
        every rank, so all of them then gather the causes together)."""
        ranks = frozenset(rank for rank, fallen in enumerate(fell_back) if fallen)
        new = ranks - self._ranks_reported
        self._ranks_reported = ranks
        return new


def fallback_warning(causes: Sequence[str], new_ranks: Collection[int]) -> str:
    """The one warning line for the ranks in `new_ranks`, given every rank's fallback cause ("" where that rank
    still runs compiled)."""
    if len(new_ranks) == len(causes) and len({causes[rank] for rank in new_ranks}) == 1:
        return f"warning: train.compile: compiling the model failed ({causes[0]}); training eager"
    ranks_by_cause: dict[str, list[str]] = {}
    for rank in sorted(new_ranks):
        ranks_by_cause.setdefault(causes[rank], []).append(str(rank))
    where = "; ".join(f"on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} ({cause})"
                      for cause, ranks in ranks_by_cause.items())
    still_compiled = sum(1 for cause in causes if not cause)
    then = f"eager there, compiled on {still_compiled} of {len(causes)} ranks" if still_compiled else "training eager"
    return f"warning: train.compile: compiling the model failed {where}; {then}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception dynamo wrapped (a missing compiler, an unsupported op), for the one-line cause."""
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return exc


def compile_engine(engine: Any, choice: CompileChoice, *, requested: CompileSetting) -> CompiledModel:
    """Compile `engine`'s module when `choice` says so (lazily: the graphs are built at the first forward)."""
    compiled = CompiledModel(choice=choice, requested=requested)
    if not choice.compiled:
        return compiled
    torch._dynamo.reset()                   # a rank trains one model; tests train several in one process
    torch.compiler.set_stance("default")
    torch._functorch.config.force_non_lazy_backward_lowering = True
    from torch._dynamo import utils as dynamo_utils
    dynamo_utils.set_compilation_metrics_limit(COMPILE_RECORDS_KEPT)
    compiled._recompiles_before = _recompiles_so_far()
    try:
        engine.compile(backend="inductor", compile_kwargs={"dynamic": True})
    except Exception as exc:   # DeepSpeed refuses some configurations up front (RuntimeError, ValueError)
        compiled._fall_back(exc)
    return compiled
