"""`arbor eval passkey` and `arbor eval ppl`: long-context quality per context length and RoPE method."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from arbor_core.errors import UsageError
from arbor_core.rope import AUTO_METHOD

from ..evals import (
    PPL_WINDOW,
    VIA,
    PasskeyReport,
    PasskeyResult,
    PerplexityRow,
    parse_lengths,
    parse_rope_methods,
    run_passkey,
    run_perplexity,
    split_sentences,
)
from ..plots import check_output, draw, stamp
from .common import (
    GlobalOptions,
    answer_console,
    handle_errors,
    load_model,
    model_options,
    notice,
    read_text_input,
    status,
    write_answer,
)

eval_app = typer.Typer(help="Long-context evaluations: passkey retrieval and perplexity at each context length.",
                       no_args_is_help=True)

LengthsOpt = Annotated[str, typer.Option("--lengths", help="Comma-separated token counts, e.g. 2k,4k,8k,16k,32k.")]
RopeOpt = Annotated[str, typer.Option("--rope", help=f"RoPE method beyond the trained context: auto (plain RoPE within "
                                      f"it, {AUTO_METHOD} beyond), none, linear, dynamic, yarn, llama3; "
                                      "several comma-separated to compare.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
PlotOpt = Annotated[str | None, typer.Option("--plot", metavar="FILE", help="Also draw the result as a picture "
                                             "(.png or .svg; needs the plot extra: pip install 'arbor-cli\\[plot]').")]


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@eval_app.command("passkey", help="Hide a random 5-digit key at a depth inside filler text and ask for it back; "
                  "accuracy per length, depth and RoPE method.")
@handle_errors
@model_options(without=("context", "rope"))
def passkey(
    lengths: LengthsOpt = "2k,4k,8k,16k,32k",
    trials: Annotated[int, typer.Option("--trials", help="Trials per length, spread evenly over the depth.")] = 4,
    rope: RopeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seeds the keys (and the prose offsets).")] = 0,
    prose: Annotated[str | None, typer.Option("--prose", metavar="FILE", help="Hide the key in this real text "
                                                 "instead of the papers' repeated filler (the harder variant).")]
    = None,
    via: Annotated[str, typer.Option("--via", help="attention: the whole prompt in one pass (per RoPE method); "
                                     "ask: the same document through `arbor ask` (part by part).")] = "attention",
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    *, opts: GlobalOptions,
) -> None:
    plot_path = check_output(plot) if plot else None
    sizes, methods = parse_lengths(lengths), parse_rope_methods(rope)
    if trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    if via not in VIA:
        raise UsageError(f"--via must be {' or '.join(VIA)}, got {via!r}")
    if via == "ask" and methods != ["auto"]:
        raise UsageError("--rope compares RoPE methods of one attention pass; --via ask reads parts within the "
                         "trained context (leave --rope out)")
    sentences = split_sentences(read_text_input(prose)[0]) if prose else None
    m = load_model(opts)
    announce = _announcer()

    def show(r: PasskeyResult) -> None:
        if via != "ask":  # ask reads parts within the trained context: no RoPE choice to announce
            announce(r.length, r.requested, r.rope, r.scaling)
        outcome = f"error: {r.error}" if r.error else ("found" if r.found else f"missed ({r.answer.strip()!r})")
        notice(f"passkey {r.length:,} · {r.requested} · depth {r.depth:.0%}: {outcome} [{r.seconds:.1f} s]")

    with status("passkey retrieval…"):
        report = run_passkey(m, sizes, methods, trials, seed, sentences, prose or "repeat", on_result=show, via=via)
    result = {"model": m.checkpoint.name, "backend": m.backend, "device": m.device, "dtype": m.dtype,
              "trained_context": m.config.trained_context, "via": via, **stamp(m.device), **report.to_json()}
    if plot_path:
        _draw("passkey", result, plot_path)
    if as_json:
        write_answer(json.dumps(result))
        return
    answer_console.print(_title(m, f"passkey retrieval, {trials} trials per length, filler: {report.filler}"))
    answer_console.print(_accuracy_table(report))
    answer_console.print(_depth_table(report))


@eval_app.command("ppl", help="Perplexity of FILE's last window of tokens with the preceding context, at each "
                  "context length (the last L tokens of FILE; lengths longer than FILE are skipped).")
@handle_errors
@model_options(without=("context", "rope"))
def ppl(
    file: Annotated[str, typer.Argument(help="A long plain-text file; '-' reads stdin.")],
    lengths: LengthsOpt = "4k,8k,16k,32k",
    rope: RopeOpt = "auto",
    window: Annotated[int, typer.Option("--window", help="Tokens scored at the end of each length.")] = PPL_WINDOW,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    *, opts: GlobalOptions,
) -> None:
    plot_path = check_output(plot) if plot else None
    sizes, methods = parse_lengths(lengths), parse_rope_methods(rope)
    if window < 1:
        raise UsageError(f"--window must be at least 1, got {window}")
    text, name = read_text_input(file)
    m = load_model(opts)
    ids = m.tokenizer.encode(text)
    notice(f"{name}: {len(ids):,} tokens")
    announce = _announcer()

    def show(r: PerplexityRow) -> None:
        announce(r.length, r.requested, r.rope, r.scaling)
        outcome = f"error: {r.error}" if r.error else f"perplexity {r.perplexity:.3f}"
        notice(f"ppl {r.length:,} · {r.requested}: {outcome} [{r.seconds:.1f} s]")

    with status("perplexity…"):
        rows = run_perplexity(m, ids, sizes, methods, window, on_row=show,
                              on_skip=lambda length, why: notice(f"skipping {length:,}: {why}"))
    result = {"model": m.checkpoint.name, "backend": m.backend, "device": m.device, "dtype": m.dtype, "file": name,
              "tokens": len(ids), "window": window, "trained_context": m.config.trained_context, "lengths": sizes,
              "rope": methods, **stamp(m.device), "rows": [r.__dict__ for r in rows]}
    if plot_path:
        _draw("ppl", result, plot_path)
    if as_json:
        write_answer(json.dumps(result))
        return
    answer_console.print(_title(m, f"perplexity of the last {window} tokens of {name}"))
    answer_console.print(_perplexity_table(rows, methods))


def _draw(kind: str, result: dict, path) -> None:
    """The picture of a result just measured; a result with nothing to draw is said, not an error of the run."""
    try:
        draw(kind, [result], path)
    except UsageError as e:
        if "matplotlib" in str(e):
            raise
        notice(f"no picture: {e}")
        return
    notice(f"wrote {path}")


def _announcer():
    """Say once per (length, requested method) which RoPE runs: the choice `auto` made goes to stderr."""
    said: set[tuple[int, str]] = set()

    def announce(length: int, requested: str, rope: str, scaling: str) -> None:
        if (length, requested) in said:
            return
        said.add((length, requested))
        chosen = f"{rope} ({scaling})" if scaling not in ("none", rope) else rope
        notice(f"{length:,} tokens: RoPE {chosen}" + (" chosen by auto" if requested == "auto" else ""))

    return announce


def _title(m, what: str) -> str:
    """One heading line above the tables: what was measured, on which model and device."""
    return (f"[bold]{escape(what)}[/bold] · {escape(m.checkpoint.name)} (trained {m.config.trained_context:,}) · "
            f"{m.backend}/{m.device}/{m.dtype}")


def _accuracy_table(report: PasskeyReport) -> Table:
    table = Table("length", *report.requested, title="accuracy (RoPE that ran)", title_justify="left")
    accuracy, chosen = report.accuracy(), report.chosen()
    for length in report.lengths:
        cells = []
        for method in report.requested:
            acc = accuracy[method][length]
            scaling = chosen.get(method, {}).get(length, {}).get("scaling", "")
            cells.append("[red]failed[/red]" if acc is None else f"{acc:.0%} [dim]{scaling}[/dim]")
        table.add_row(f"{length:,}", *cells)
    return table


def _depth_table(report: PasskeyReport) -> Table:
    table = Table("length", "depth", "key", *report.requested, title="per trial (✓ found, ✗ missed)",
                  title_justify="left")
    by_trial = {(r.length, r.trial, r.requested): r for r in report.results}
    for length in report.lengths:
        for trial in range(report.trials):
            first = next((by_trial[(length, trial, m)] for m in report.requested if (length, trial, m) in by_trial),
                         None)
            if first is None:
                continue
            marks = [_mark(by_trial.get((length, trial, m))) for m in report.requested]
            table.add_row(f"{length:,}", f"{first.key_depth:.0%}", first.key, *marks)
    return table


def _mark(r: PasskeyResult | None) -> str:
    if r is None or r.error:
        return "[red]error[/red]"
    return "[green]✓[/green]" if r.found else "[red]✗[/red]"


def _perplexity_table(rows: list[PerplexityRow], methods: list[str]) -> Table:
    table = Table("length", *methods)
    by_key = {(r.length, r.requested): r for r in rows}
    for length in sorted({r.length for r in rows}):
        cells = []
        for method in methods:
            r = by_key.get((length, method))
            if r is None or r.error:
                cells.append("[red]failed[/red]")
            else:
                scaling = f" [dim]{r.scaling}[/dim]" if r.scaling != "none" else ""
                cells.append(f"{r.perplexity:.3f}{scaling}")
        table.add_row(f"{length:,}", *cells)
    return table
