"""The `deepfleet` command. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import sys

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError   # typer vendors click; not re-exported

from deepfleet.cli import launch_cmd
from deepfleet.cli import fleet_cmd
from deepfleet.cli import train_cmd
from deepfleet.cli import export_cmd
from deepfleet.cli import plan_cmd
from deepfleet.cli import bench_cmd
from deepfleet.cli import env_cmd
from deepfleet.cli import slurm_cmd
from deepfleet.cli import sync_cmd
from deepfleet.cli import sweep_cmd
from deepfleet.errors import DeepfleetError

app = typer.Typer(
    name="deepfleet",
    help="From a few GPU servers to a fine-tuned LLM across all of them, with DeepSpeed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root() -> None:
    """From a few GPU servers to a fine-tuned LLM across all of them, with DeepSpeed."""


app.command("launch", context_settings=launch_cmd.LAUNCH_CONTEXT)(launch_cmd.launch)
fleet_cmd.register(app)
app.command("train")(train_cmd.train)
app.command("sweep")(sweep_cmd.sweep)
app.command("prepare")(train_cmd.prepare)
app.command("generate")(train_cmd.generate)
app.command("demo")(train_cmd.demo)
app.command("export")(export_cmd.export)
app.command("plan")(plan_cmd.plan)
app.command("check-ds-config")(plan_cmd.check_ds_config)
app.command("sync")(sync_cmd.sync)
slurm_cmd.register(app)
app.add_typer(bench_cmd.bench_app, name="bench")
app.add_typer(env_cmd.env_app, name="env")


def usage_line(exc: UsageError) -> str:
    """A usage error as deepfleet's one error line (click would print a boxed panel)."""
    command = exc.ctx.command_path if exc.ctx else "deepfleet"
    message = " ".join(exc.format_message().split())
    return f"error: {command}: {message} (fix: see `{command} --help`)"


def main() -> None:
    try:
        result = app(prog_name="deepfleet", standalone_mode=False)
    except DeepfleetError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        print(usage_line(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)   # typer.Exit(code) comes back as the code


if __name__ == "__main__":
    main()
