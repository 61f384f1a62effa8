"""`arbor pull`, `arbor models`, `arbor rm`: the local model cache."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import DebugOpt, answer_console, console, handle_errors, write_answer


def register(app: typer.Typer) -> None:
    app.command(help="Download or import a model: a known name, hf:ORG/NAME, or a path (HF dir, .gguf).")(pull)
    app.command(help="List the models in the local cache.")(models)
    app.command(name="rm", help="Remove a model from the local cache.")(rm)


@handle_errors
def pull(name: Annotated[str, typer.Argument(help="Model name, hf:ORG/NAME, or path.")],
         force: Annotated[bool, typer.Option("--force", help="Re-download and re-convert.")] = False,
         debug: DebugOpt = False) -> None:
    import arbor_weights

    checkpoint = arbor_weights.pull(name, force=force)
    console.print(f"[green]ready:[/green] {checkpoint.name} ({checkpoint.path})", highlight=False)


@handle_errors
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
           debug: DebugOpt = False) -> None:
    import arbor_weights

    rows = arbor_weights.list_models()
    if as_json:
        write_answer(json.dumps(rows, default=str))
        return
    if not rows:
        console.print("no models yet: `arbor pull smollm2-135m-instruct` (or any command) fetches the default")
        return
    table = Table("name", "size", "parameters", "trained context", "source", box=None)
    for r in rows:
        table.add_row(escape(r["name"]), f"{r['size_bytes'] / 1e6:,.0f} MB", f"{r['parameters'] / 1e6:,.1f}M",
                      f"{r['trained_context']:,}", escape(str(r["source"])))
    answer_console.print(table)


@handle_errors
def rm(name: Annotated[str, typer.Argument(help="Installed model name.")], debug: DebugOpt = False) -> None:
    import arbor_weights

    arbor_weights.remove_model(name)
    console.print(f"removed {name}", highlight=False, markup=False)
