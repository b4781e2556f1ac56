"""Run by torchrun in the integration tests: several short trainings in one process group.

Starting torchrun, DeepSpeed and transformers costs far more than 8 tiny steps, so one launch
trains every (ZeRO stage, method) recipe given, in order, through the same functions the
per-rank entry uses (`build_training_run`, `train_and_save`). After each, every rank runs the
trained engine on a fixed batch (a collective under ZeRO-3) and rank 0 stores the logits next
to the saved model, for the save -> from_pretrained comparison.
"""

import gc
import json
import sys

import torch

from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train.distributed import RankEnv, exit_rank
from deepfleet.train.loop import build_training_run, train_and_save

PROBE = [[5, 17, 23, 42, 8, 9, 61, 3, 30, 12]]


def main(recipe_paths: list[str]) -> None:
    rank_env = RankEnv.from_environ()
    for path in recipe_paths:
        recipe = load_recipe(path)
        run = build_training_run(recipe, rank_env)
        result = train_and_save(run)
        run.engine.eval()
        with torch.no_grad():
            logits = run.engine(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
        if rank_env.is_main:
            torch.save(logits, recipe.output_path / "engine_logits.pt")
            (recipe.output_path / "result.json").write_text(json.dumps(
                {"first_loss": result.first_loss, "last_loss": result.last_loss, "val_loss": result.val_loss,
                 "steps": result.steps, "n_trainable": run.built.n_trainable, "n_params": run.built.n_params}))
        # ZeRO-3's HfDeepSpeedConfig is global while referenced: drop it before the next model loads.
        del run
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_rank(0)
