"""`arbor bench`: prefill time, decode speed and peak memory at growing contexts, optionally beside transformers."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from arbor_core.errors import UsageError

from ..bench import DECODE_TOKENS, PEERS, parse_contexts, run_bench
from .common import (
    GlobalOptions,
    answer_console,
    handle_errors,
    load_model,
    model_options,
    notice,
    status,
    write_answer,
)


def _weights(m) -> str:
    """What arbor ran: the dtype, or the quantized weights and whether decode was the compiled step."""
    if not m.lm.quantize:
        return m.dtype
    compiled = getattr(m.lm, "compiled", None)
    step = " · compiled decode" if compiled is not None and compiled.run is not None else ""
    return f"{m.lm.quantize} weights, {m.dtype} activations{step}"


def register(app: typer.Typer) -> None:
    app.command(help="Measure prefill, decode and peak memory at each context; stops at the first that fails.")(bench)


@handle_errors
@model_options(without=("context", "rope"))
def bench(
    contexts: Annotated[str, typer.Option("--contexts", help="Comma-separated sizes, e.g. 4k,16k,32k.")]
    = "4k,16k,32k,64k,128k",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens decoded at each context.")] = DECODE_TOKENS,
    vs: Annotated[str, typer.Option("--vs", help="Also run a peer on the same weights: hf (transformers) or "
                                    "llama.cpp (llama-cpp-python on the GGUF file).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    plot: Annotated[str | None, typer.Option("--plot", metavar="FILE", help="Also draw prefill, decode and memory "
                                             "against context (.png or .svg; the plot extra).")] = None,
    *, opts: GlobalOptions,
) -> None:
    from ..plots import check_output, draw, stamp

    plot_path = check_output(plot) if plot else None
    sizes = parse_contexts(contexts)
    if vs not in ("", *PEERS):
        raise UsageError(f"--vs takes 'hf' (transformers) or 'llama.cpp', got {vs!r}")
    if tokens < 2:
        raise UsageError("--tokens must be at least 2")
    m = load_model(opts)

    def show(row):
        if row.error:
            notice(f"{row.engine} at {row.context:,}: {row.error}; stopping")
        else:
            notice(f"{row.engine} at {row.context:,}: prefill {row.prefill_s:.2f} s, "
                   f"decode {row.decode_tokens_per_s:.1f} tok/s")

    with status("benchmarking…"):
        rows = run_bench(m, sizes, tokens, vs=vs, on_row=show)
    result = {"backend": m.backend, "device": m.device, "dtype": m.dtype, "quantize": m.lm.quantize,
              "model": m.checkpoint.name, **stamp(m.device), "rows": [r.to_json() for r in rows]}
    if plot_path:
        try:
            draw("bench", [result], plot_path)
            notice(f"wrote {plot_path}")
        except UsageError as e:
            if "matplotlib" in str(e):
                raise
            notice(f"no picture: {e}")
    if as_json:
        write_answer(json.dumps(result))
        return
    table = Table("engine", "context", "prefill", "prefill tok/s", "decode tok/s", "peak memory", "RoPE",
                  title=f"{escape(m.checkpoint.name)} · {m.backend}/{m.device} · {_weights(m)}", title_justify="left")
    for r in rows:
        if r.error:
            table.add_row(r.engine, f"{r.context:,}", "[red]failed[/red]", "", "", "", escape(r.error[:40]))
            continue
        peak = f"{r.peak_memory_bytes / (1 << 30):.2f} GiB" if r.peak_memory_bytes else "-"
        table.add_row(r.engine, f"{r.context:,}", f"{r.prefill_s:.2f} s", f"{r.prefill_tokens_per_s:,.0f}",
                      f"{r.decode_tokens_per_s:,.1f}", peak, r.rope)
    answer_console.print(table)
