"""Run by torchrun in test_chunked_loss_training.py: the same short training with the chunked loss on and off.

The chunk is shrunk to 16 tokens per chunk (a test-only setting) so every micro batch spans many chunks."""

import gc
import json
import sys
from dataclasses import replace

from deepfleet.plan.recipe_io import load_recipe
from deepfleet.train.distributed import RankEnv, exit_rank
from deepfleet.train.loop import build_training_run, train_and_save


def main(recipe_paths: list[str]) -> None:
    rank_env = RankEnv.from_environ()
    for path in recipe_paths:
        recipe = load_recipe(path)
        run = build_training_run(recipe, rank_env)
        if run.built.loss.chunked:
            run.built.loss = replace(run.built.loss, chunk_tokens=16)
        result = train_and_save(run)
        if rank_env.is_main:
            (recipe.output_path / "result.json").write_text(json.dumps(
                {"loss": run.built.loss.describe(), "val_loss": result.val_loss}))
        del run   # ZeRO-3's HfDeepSpeedConfig is global while referenced: drop it before the next model loads
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_rank(0)
