"""`arbor grow SRC DST`: a larger model that computes exactly what SRC does, ready to train; `grow_model`
does the same for a loaded Model and loads the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from arbor_core.number_input import check_number

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

    check_number(depth, "--depth", minimum=1)
    check_number(width, "--width", minimum=1)
    checkpoint = arbor_weights.resolve(source)
    with status("growing…"):
        path, before, after = grow_checkpoint(checkpoint, destination, depth, width, seed)
    notice(f"parameters {before / 1e6:,.1f}M → {after / 1e6:,.1f}M ({after / before:.2f}x)")
    write_answer(str(path))


def grow_model(model, depth: float = 1.0, width: float = 1.0, destination=None, seed: int = 0):
    """`model` (a Model) grown without changing what it computes (arbor_weights/grow.py: identity blocks for
    `depth`, split neurons and heads for `width`), written as a normal checkpoint at `destination`
    (default: under the cache, named for the growth, reused when already there) and loaded like `model`."""
    from arbor_weights.grow import grow_checkpoint, grown_destination

    from ..loading import load

    if destination is None:
        destination = grown_destination(model.checkpoint, depth, width, seed)
        if (Path(destination) / "config.json").is_file():
            return load(str(destination), backend=model.backend, device=str(model.device), quiet=True,
                        kv_bits=model.lm.kv_bits, dtype=model.dtype)
    path, _, _ = grow_checkpoint(model.checkpoint, destination, depth, width, seed)
    return load(str(path), backend=model.backend, device=str(model.device), quiet=True, kv_bits=model.lm.kv_bits,
                dtype=model.dtype)
