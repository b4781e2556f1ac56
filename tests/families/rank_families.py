"""Run by torchrun in the family training test: several short trainings in one process group.

Like tests/integration/rank_matrix.py: one launch trains every recipe given, in order, through the
functions the per-rank entry uses. After each, every rank runs the trained engine on a fixed probe
(a collective under ZeRO-3) and rank 0 stores the logits beside the saved model. For MoE models each
rank also records how many tokens each router sent to each expert, to show routing differed.
"""

import gc
import json
import sys

import torch

from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train.distributed import RankEnv, exit_rank
from deepfleet.train.loop import build_training_run, train_and_save

PROBE = [[5, 17, 23, 42, 8, 9, 61, 3, 30, 12, 77, 101]]


def count_expert_choices(model: torch.nn.Module, family) -> dict[str, list[int]]:
    """Hooks every router of the MoE blocks: tokens per expert, per layer, on this rank."""
    counts: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == family.moe_block:
            def hook(router, inputs, output, name=name):
                indices = output[-1].flatten()
                per_expert = torch.bincount(indices, minlength=router.num_experts).tolist()
                counts[name] = [a + b for a, b in zip(counts.get(name, [0] * len(per_expert)), per_expert)]
            module.gate.register_forward_hook(hook)
    return counts


def main(recipe_paths: list[str]) -> None:
    rank_env = RankEnv.from_environ()
    for path in recipe_paths:
        recipe = load_recipe(path)
        run = build_training_run(recipe, rank_env)
        routing = count_expert_choices(run.engine.module, run.built.family) if run.built.family.is_moe else {}
        result = train_and_save(run)
        run.engine.eval()
        with torch.no_grad():
            logits = run.engine(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
        if routing:
            (recipe.output_path / f"routing-rank{rank_env.rank}.json").write_text(json.dumps(routing))
        if rank_env.is_main:
            torch.save(logits, recipe.output_path / "engine_logits.pt")
            (recipe.output_path / "result.json").write_text(json.dumps(
                {"first_loss": result.first_loss, "last_loss": result.last_loss, "steps": result.steps,
                 "n_trainable": run.built.n_trainable, "n_params": run.built.n_params,
                 "zero3_leaf_modules": sorted({type(module).__name__ for module in run.engine.module.modules()
                                               if getattr(module, "_z3_leaf", False)})}))
        del run   # ZeRO-3's HfDeepSpeedConfig is global while referenced
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_rank(0)
