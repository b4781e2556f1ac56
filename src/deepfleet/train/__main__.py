"""Per-rank entry, started by the host agent (or a hand-run torchrun): `python -m deepfleet.train`.

The resolved recipe comes in $DEEPFLEET_RECIPE (or `--recipe FILE` for a hand-run torchrun).
Library output (DeepSpeed, transformers) goes to stderr; rank 0 keeps the real stdout for its
console lines. A `DeepfleetError` is printed as its one line (`error: ...`), which the launcher
shows instead of a traceback, and the rank exits with 2. A preempted rank (checkpoint written)
prints `preempted: ...` and exits with 75. See `deepfleet/contract.py`. After a clean end the rank destroys
its process group; it exits through `exit_rank`, which skips the interpreter's teardown (see there).
"""

from __future__ import annotations

import argparse
import os
import sys

from deepfleet.contract import EXIT_PREEMPTED, RECIPE_ENV, preempted_line


def claim_console() -> "object":
    """Keep the real stdout for our console; everything else that prints to stdout goes to stderr."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return console


def main(argv: list[str] | None = None) -> int:
    console = claim_console()
    parser = argparse.ArgumentParser(prog="python -m deepfleet.train")
    parser.add_argument("--recipe", help="resolved recipe (YAML or JSON); default: the JSON text in "
                                         f"${RECIPE_ENV}, which the launcher sets (hosts share no files)")
    args = parser.parse_args(argv)
    if args.recipe is None and RECIPE_ENV not in os.environ:
        parser.error(f"give --recipe or set ${RECIPE_ENV}")

    from deepfleet.errors import DeepfleetError
    from deepfleet.train.distributed import RankEnv, close_distributed
    from deepfleet.train.startup_marks import StartupMarks
    from deepfleet.train.preemption import Preempted

    rank_env = RankEnv.from_environ()
    startup = StartupMarks()
    try:
        from deepfleet.plan.recipe_io import load_recipe, parse_recipe
        from deepfleet.train.loop import run_training

        recipe = load_recipe(args.recipe) if args.recipe else parse_recipe(os.environ[RECIPE_ENV], f"${RECIPE_ENV}")
        run_training(recipe, rank_env, console_stream=console if rank_env.is_main else None, startup=startup)
        exit_code = 0
    except DeepfleetError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except Preempted as stop:
        print(preempted_line(stop.step, str(stop.checkpoint)), file=sys.stderr)
        exit_code = EXIT_PREEMPTED
    finally:
        console.flush()
    close_distributed()
    return exit_code


if __name__ == "__main__":
    from deepfleet.train.distributed import exit_rank

    exit_rank(main())
