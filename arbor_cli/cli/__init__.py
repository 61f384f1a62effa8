"""The `arbor` command: typer app, one module per command. Presentation only: it calls the API."""

from __future__ import annotations

import sys

import click
import typer

from . import bench, chat, eval, generate, info, models, summarize

app = typer.Typer(
    name="arbor",
    help="Run Llama-family language models locally; long documents sized to your machine's memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for module in (chat, summarize, generate, models, info, bench, eval):
    module.register(app)

# typer now raises the exceptions of its own vendored copy of click: catch both families
CLICK_ERRORS = (click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def main(argv: list[str] | None = None) -> None:
    try:
        rc = app(args=argv, prog_name="arbor", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("arbor: interrupted", file=sys.stderr)
        sys.exit(130)
    except CLICK_ERRORS as e:  # a bad option value, an unknown option: one line, exit 2
        print(f"arbor: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("arbor: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
