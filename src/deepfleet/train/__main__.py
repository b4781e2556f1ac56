"""Per-rank entry, run by torchrun: `python -m deepfleet.train --recipe RESOLVED.json`.

Library output (DeepSpeed, transformers) goes to stderr, which the launcher captures in a log;
rank 0 keeps the real stdout for the progress bar. A `DeepfleetError` is written to
`$DEEPFLEET_RUN_DIR/errors/rank-<RANK>.txt`, so the launcher prints that one line instead of a
traceback, and the rank exits with 2. A preempted rank (checkpoint written) exits with 75.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deepfleet.contract import ERRORS_SUBDIR, EXIT_PREEMPTED, PREEMPTED_FILE, RECIPE_ENV, preempted_line


def claim_console() -> "object":
    """Keep the real stdout for our console; everything else that prints to stdout goes to stderr."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return console


def write_rank_error(run_dir: Path | None, rank: int, text: str) -> None:
    if run_dir is None:
        return
    errors = run_dir / ERRORS_SUBDIR
    errors.mkdir(parents=True, exist_ok=True)
    (errors / f"rank-{rank}.txt").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    console = claim_console()
    parser = argparse.ArgumentParser(prog="python -m deepfleet.train")
    parser.add_argument("--recipe", help="resolved recipe (YAML or JSON) written by the launcher; default: "
                                           f"the JSON text in ${RECIPE_ENV} (multi-host: hosts share no files)")
    args = parser.parse_args(argv)
    if args.recipe is None and RECIPE_ENV not in os.environ:
        parser.error(f"give --recipe or set ${RECIPE_ENV}")

    from deepfleet.errors import DeepfleetError
    from deepfleet.train.distributed import RankEnv
    from deepfleet.train.preemption import Preempted

    rank_env = RankEnv.from_environ()
    try:
        from deepfleet.plan.recipe_io import load_recipe, parse_recipe
        from deepfleet.train.loop import run_training

        recipe = load_recipe(args.recipe) if args.recipe else parse_recipe(os.environ[RECIPE_ENV], f"${RECIPE_ENV}")
        run_training(recipe, rank_env, console_stream=console if rank_env.is_main else None)
    except DeepfleetError as exc:
        write_rank_error(rank_env.run_dir, rank_env.rank, exc.render())
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except Preempted as stop:
        if rank_env.is_main and rank_env.run_dir is not None:
            (rank_env.run_dir / PREEMPTED_FILE).write_text(
                json.dumps({"step": stop.step, "checkpoint": str(stop.checkpoint)}) + "\n")
        print(preempted_line(stop.step, str(stop.checkpoint)), file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
