"""`arbor info`: the machine, the model, and how much context fits in memory now."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .. import planner
from .common import (
    BackendOpt,
    ContextOpt,
    DebugOpt,
    DeviceOpt,
    GlobalOptions,
    KvBitsOpt,
    ModelOpt,
    QuantizeOpt,
    RopeOpt,
    answer_console,
    handle_errors,
    load_model,
    write_answer,
)


def register(app: typer.Typer) -> None:
    app.command(help="Show backend, device, memory, the model and the context sizes that fit now.")(info)


def machine_report(m) -> dict:
    mem = m.lm.memory()
    budget = planner.memory_budget(mem.free_bytes, mem.total_bytes, resident_bytes=m.lm.weights_nbytes)
    kv_scale_bytes = getattr(m.lm, "kv_scale_bytes", 0)
    rows = planner.bucket_table(m.config, budget, m.lm.weights_nbytes, m.lm.kv_element_bytes,
                                m.lm.act_element_bytes, m.prefill_chunk, kv_scale_bytes=kv_scale_bytes)
    fitting = [r.context for r in rows if r.fits]
    return {
        "backend": m.backend, "device": m.device, "dtype": m.dtype,
        "memory_total_bytes": mem.total_bytes, "memory_free_bytes": mem.free_bytes,
        "model": m.checkpoint.name, "parameters": m.num_parameters(), "weights_bytes": m.lm.weights_nbytes,
        "trained_context": m.config.trained_context, "max_context": fitting[-1] if fitting else 0,
        "rope_method": m.rope_method,
        "kv_bits": getattr(m.lm, "kv_bits", 16),
        "quantize": getattr(m.lm, "quantize", None),
        "kv_bytes_per_token": m.config.kv_bytes_per_token(m.lm.kv_element_bytes, kv_scale_bytes),
        "sliding_window": m.config.sliding_window,
        "kv_cached_tokens_max": planner.kv_cache_tokens(m.config, planner.BUCKETS[-1], m.prefill_chunk),
        "buckets": [{"context": r.context, "bytes": r.bytes, "fits": r.fits,
                     "rope_scaling": m.rope_scaling_for(r.context)} for r in rows],
    }


@handle_errors
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
         model: ModelOpt = None, backend: BackendOpt = None, device: DeviceOpt = None, context: ContextOpt = None,
         rope: RopeOpt = "auto", kv_bits: KvBitsOpt = 16, quantize: QuantizeOpt = None,
         debug: DebugOpt = False) -> None:
    opts = GlobalOptions(model, backend, device, context, debug, rope, kv_bits=kv_bits, quantize=quantize)
    report = machine_report(load_model(opts))
    if as_json:
        write_answer(json.dumps(report))
        return
    gib = 1 << 30
    summary = Table.grid(padding=(0, 2))
    for key, value in [
        ("backend", f"{report['backend']} on {report['device']} ({report['dtype']})"),
        ("memory", f"{report['memory_free_bytes'] / gib:.1f} GiB free of {report['memory_total_bytes'] / gib:.1f} GiB"),
        ("model", f"{report['model']} · {report['parameters'] / 1e6:.1f}M parameters · "
                  f"{report['weights_bytes'] / gib:.2f} GiB of weights"
                  + (f" ({report['quantize']})" if report["quantize"] else "")),
        ("trained context", f"{report['trained_context']:,} tokens"),
        ("KV cache", _kv_line(report)),
        ("largest context now", f"{report['max_context']:,} tokens"),
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


def _kv_line(report: dict) -> str:
    precision = "int8 + float16 scales" if report["kv_bits"] == 8 else report["dtype"]
    line = f"{precision} · {report['kv_bytes_per_token'] / 1024:.1f} KiB per token"
    if report["sliding_window"]:
        line += f" · sliding window {report['sliding_window']:,}: at most {report['kv_cached_tokens_max']:,} tokens cached"
    return line
