"""`arbor grow SRC DST`: a larger model that computes exactly what SRC does, ready to train."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import handle_errors, notice, status, write_answer


def register(app: typer.Typer) -> None:
    app.command("grow", help="Grow a model without changing what it computes: --depth adds identity blocks, "
                "--width splits MLP neurons (and attention heads by a whole factor); writes a normal checkpoint.")(grow)


@handle_errors
def grow(
    source: Annotated[str, typer.Argument(help="Model name, hf:ORG/NAME, or path.", show_default=False)],
    destination: Annotated[str, typer.Argument(help="The directory to write (absent or empty).", show_default=False)],
    depth: Annotated[float, typer.Option("--depth", help="Layers x this (rounded); new blocks start as identities.")]
    = 1.0,
    width: Annotated[float, typer.Option("--width", help="MLP neurons x this; attention heads too when whole.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds how split neurons share their outputs.")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    import arbor_weights
    from arbor_weights.grow import grow_checkpoint

    checkpoint = arbor_weights.resolve(source)
    with status("growing…"):
        path, before, after = grow_checkpoint(checkpoint, destination, depth, width, seed)
    notice(f"parameters {before / 1e6:,.1f}M → {after / 1e6:,.1f}M ({after / before:.2f}x)")
    write_answer(str(path))
