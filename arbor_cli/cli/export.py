"""`arbor export SRC DST --format hf`: a model as a Hugging Face directory, for transformers and vLLM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from arbor_core.errors import UsageError
from arbor_core.number_input import check_number

from .common import handle_errors, notice, status, write_answer


def register(app: typer.Typer) -> None:
    app.command("export", help="Write a model as a Hugging Face directory (config.json, model.safetensors, the "
                "tokenizer with its chat template) that transformers loads and vLLM serves as it is.")(export)


@handle_errors
def export(
    source: Annotated[str, typer.Argument(help="Model name, hf:ORG/NAME, or path (HF dir, Arbor dir, .gguf).",
                                          show_default=False)],
    destination: Annotated[str, typer.Argument(help="The directory to write (absent or empty).", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="hf: a Hugging Face model directory.")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16 or float32.")] = "bfloat16",
    context: Annotated[Optional[int], typer.Option("--context", help="The context the exported model is meant "
                                                   "to run at: beyond the trained one, config.json carries the "
                                                   "rope_scaling arbor would use there.")] = None,
    rope: Annotated[str, typer.Option("--rope", help="RoPE method for --context beyond the trained one (auto: "
                                      "what arbor runs).")] = "auto",
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    import arbor_weights
    from arbor_core.rope import resolve_method, scaling_for_context
    from arbor_weights.export import FORMATS, export_hf

    if format not in FORMATS:
        raise UsageError(f"--format must be {' or '.join(FORMATS)}, got {format!r}")
    try:
        resolve_method(rope)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if context is not None:
        check_number(context, "--context", int, minimum=1)
    checkpoint = arbor_weights.resolve(source)
    trained = checkpoint.config.trained_context
    scaling = scaling_for_context(checkpoint.config, context, rope) if context else None
    if context and context > trained:
        notice(f"context {context:,} is beyond the trained {trained:,}: config.json gets rope_scaling {scaling}")
    with status("exporting…"):
        path = export_hf(checkpoint, destination, dtype=dtype, rope_scaling=scaling)
    notice(f"wrote {checkpoint.name} as a Hugging Face model ({dtype})")
    write_answer(str(path))
