"""`arbor cache ls|rm|clear`: the documents' KV caches kept on disk (arbor_cli/doc_cache.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import DebugOpt, answer_console, console, handle_errors, write_answer

cache_app = typer.Typer(help="The documents' KV caches `arbor ask` keeps on disk.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


@cache_app.command(name="ls", help="List the kept document caches, most recently used first.")
@handle_errors
def ls(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
       debug: DebugOpt = False) -> None:
    from .. import doc_cache

    rows = doc_cache.entries()
    if as_json:
        write_answer(json.dumps(rows))
        return
    if not rows:
        console.print(f"no document caches yet ({doc_cache.directory()})", highlight=False, markup=False)
        return
    table = Table("name", "document", "model", "tokens", "context", "kv bits", "size", "last used", box=None)
    for r in rows:
        table.add_row(r["name"], r["document"], escape(str(r["model"])), _count(r["tokens"]), _count(r["context"]),
                      str(r["kv_bits"] or "?"), f"{r['bytes'] / 1e6:,.1f} MB", r["last_used"])
    answer_console.print(table)


@cache_app.command(name="rm", help="Remove one kept document cache (a name from `arbor cache ls`).")
@handle_errors
def rm(name: Annotated[str, typer.Argument(help="Entry name, as `arbor cache ls` shows it.")],
       debug: DebugOpt = False) -> None:
    from arbor_core.errors import ArborError

    from .. import doc_cache

    if not doc_cache.remove(name):
        known = ", ".join(r["name"] for r in doc_cache.entries()) or "none"
        raise ArborError(f"no document cache named {name!r} (kept: {known})")
    console.print(f"removed {name}", highlight=False, markup=False)


@cache_app.command(name="clear", help="Remove every kept document cache.")
@handle_errors
def clear(debug: DebugOpt = False) -> None:
    from .. import doc_cache, document_index

    removed = doc_cache.clear()
    document_index.clear()  # what ask worked out about each document's text (its tokens, parts, word counts)
    console.print(f"removed {removed} document cache{'s' if removed != 1 else ''}", highlight=False, markup=False)


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"
