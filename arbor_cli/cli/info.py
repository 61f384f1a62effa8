"""`arbor info`: the machine, the model, and how much context fits in memory now."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import GlobalOptions, answer_console, handle_errors, load_model, model_options, write_answer


def register(app: typer.Typer) -> None:
    app.command(help="Show backend, device, memory, the model and the context sizes that fit now.")(info)


@handle_errors
@model_options
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
         *, opts: GlobalOptions) -> None:
    report = load_model(opts).memory_report()
    if as_json:
        write_answer(json.dumps(report))
        return
    gib = 1 << 30
    summary = Table.grid(padding=(0, 2))
    for key, value in [
        ("backend", f"{report['backend']} on {report['device']}"),
        ("precision", f"weights {report['quantize'] or report['dtype']} · activations {report['dtype']}"),
        ("memory", f"{report['memory_free_bytes'] / gib:.1f} GiB free of {report['memory_total_bytes'] / gib:.1f} GiB"),
        ("model", f"{escape(report['model'])} · {_parameters(report)} · "
                  f"{report['weights_bytes'] / gib:.2f} GiB of weights"),
        ("trained context", f"{report['trained_context']:,} tokens"),
        ("KV cache", _kv_line(report)),
        ("largest context now", f"{report['max_context']:,} tokens"),
        ("decoded at once", f"{report['batch']} sequences of {report['batch_context']:,} tokens "
                            "(serve --parallel's default)"),
    ]:
        summary.add_row(f"[bold]{key}[/bold]", value)
    table = Table("context", "memory needed", "fits now", "RoPE", title="context buckets", title_justify="left",
                  caption="memory = weights + KV cache + prefill workspace", caption_justify="left")
    for b in report["buckets"]:
        rope = b["rope_scaling"]
        table.add_row(f"{b['context']:,}", f"{b['bytes'] / gib:.2f} GiB", "yes" if b["fits"] else "no",
                      f"{rope['rope_type']} ×{rope['factor']:g}" if rope else "native")
    answer_console.print(summary)
    answer_console.print(table)


def _parameters(report: dict) -> str:
    """The count, and why it may differ from a model card's: an output head stored apart from the embedding."""
    count, head = report["parameters"], report.get("output_head_parameters") or 0
    line = f"{count / 1e6:,.1f}M parameters"
    if head:
        line += f" ({head / 1e6:,.1f}M of them an output head kept apart from the embedding; {(count - head) / 1e6:,.1f}M without it)"
    return line


def _kv_line(report: dict) -> str:
    precision = "int8 + float16 scales" if report["kv_bits"] == 8 else report["dtype"]
    line = f"{precision} · {report['kv_bytes_per_token'] / 1024:.1f} KiB per token"
    full, layers = report.get("full_context_layers", report.get("layers")), report.get("layers")
    if report["sliding_window"] and full:  # some layers windowed, some global: the global ones grow with the context
        line += (f" · {layers - full} of {layers} layers keep only a {report['sliding_window']:,}-token window, "
                 f"so a token of context costs {report['kv_bytes_per_token'] * full / layers / 1024:.1f} KiB")
    elif report["sliding_window"]:
        line += f" · sliding window {report['sliding_window']:,}: at most {report['kv_cached_tokens_max']:,} tokens cached"
    return line
