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
    app.command(help="List the models in the local cache (--available: the models `arbor pull NAME` fetches).")(models)
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
           available: Annotated[bool, typer.Option("--available", help="List the models arbor can pull by name, "
                                                   "with download size, licence and what each is for.")] = False,
           debug: DebugOpt = False) -> None:
    import arbor_weights

    if available:
        _available(as_json, {row["name"] for row in arbor_weights.list_models()})
        return
    rows = arbor_weights.list_models()
    if as_json:
        write_answer(json.dumps(rows, default=str))
        return
    if not rows:
        console.print("no models yet: any command fetches the default; `arbor models --available` lists the "
                      "models `arbor pull NAME` fetches", highlight=False)
        return
    table = Table("name", "size", "parameters", "trained context", "source", box=None)
    for r in rows:
        table.add_row(escape(r["name"]), f"{r['size_bytes'] / 1e6:,.0f} MB", f"{r['parameters'] / 1e6:,.1f}M",
                      f"{r['trained_context']:,}", escape(str(r["source"])))
    answer_console.print(table)
    pullable = [row for row in arbor_weights.available_models(set()) if row["name"] not in {r["name"] for r in rows}]
    if pullable:
        console.print(f"{len(pullable)} more to pull by name: `arbor models --available`", highlight=False)


def _available(as_json: bool, installed: set[str]) -> None:
    import arbor_weights

    rows = arbor_weights.available_models(installed)
    if as_json:
        write_answer(json.dumps(rows))
        return
    table = Table("name", "download", "good for", "licence", "", box=None)
    for r in rows:
        mark = ", ".join(word for word, on in (("default", r["default"]), ("installed", r["installed"])) if on)
        licence = (r["licence"] or "not stated").split(" (")[0]  # the terms' name; --json has the link
        table.add_row(escape(r["name"]), f"{r['download_bytes'] / 1e6:,.0f} MB", escape(r["good_for"]),
                      escape(licence), mark)
    answer_console.print(table)


@handle_errors
def rm(name: Annotated[str, typer.Argument(help="Installed model name.")], debug: DebugOpt = False) -> None:
    import arbor_weights

    arbor_weights.remove_model(name)
    console.print(f"removed {name}", highlight=False, markup=False)
