"""The `arbor` command: typer app, one module per command. Presentation only: it calls the API."""

from __future__ import annotations

import importlib
import sys

import click
import typer

from .streams import guard_closed_std_streams

guard_closed_std_streams()  # before the consoles below are made: a closed stdout/stderr must not crash or leak

from .common import silence_stdout, describe_error  # noqa: E402

# one module per command, each with register(app); `arbor --help` lists them in this order
COMMAND_MODULES = ("chat", "summarize", "ask", "extract", "generate", "serve", "export", "grow", "train", "models", "cache",
                   "info", "bench", "eval", "plot")

app = typer.Typer(
    name="arbor",
    help="Run Llama-family language models locally; long documents sized to your machine's memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for name in COMMAND_MODULES:
    importlib.import_module(f".{name}", __name__).register(app)

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
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `arbor`: the help is printed, and that is all
            sys.exit(0)
        print(f"arbor: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("arbor: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `arbor --help | head`: the reader left; nothing to say
        silence_stdout()
        sys.exit(1)
    except OSError as e:  # help or usage text that cannot be written (a closed stdout)
        print(f"arbor: error: {describe_error(e)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
