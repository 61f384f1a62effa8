"""`arbor plot passkey|ppl|bench RESULT.json… --out FILE`: redraw saved `--json` results without rerunning them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..plots import KINDS, check_output, draw, load_result
from .common import handle_errors, notice


def register(app: typer.Typer) -> None:
    app.command(help="Draw saved results (`arbor eval passkey|ppl --json`, `arbor bench --json`) as a PNG or SVG; "
                     "several results of one kind share the picture.")(plot)


@handle_errors
def plot(
    kind: Annotated[str, typer.Argument(help=f"What the results are: {', '.join(KINDS)}.")],
    results: Annotated[list[str], typer.Argument(help="The JSON result files.")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="The picture: .png or .svg (default: the first "
                                            "result's name with .png).")] = None,
    machine: Annotated[str | None, typer.Option("--machine", help="The machine, for results that do not record it "
                                                "(older ones).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    path = check_output(out or Path(results[0]).with_suffix(".png"))
    loaded = [load_result(r, kind) for r in results]
    if machine:
        loaded = [{**data, "machine": data.get("machine") or machine} for data in loaded]
    shown = draw(kind, loaded, path)
    notice(f"wrote {path} ({', '.join(f'{v} {k}' for k, v in shown.items())})")
