"""`arbor summarize`: a summary of FILE (or stdin) on stdout; progress, notices and errors on stderr."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..summarize import summarize_documents
from ..summary_prompts import DEFAULT_WORDS, MAX_WORDS, SummaryOptions
from .common import (
    GlobalOptions,
    MaxInputOpt,
    handle_errors,
    load_model,
    max_input_bytes,
    model_options,
    notice,
    read_documents,
    write_answer,
)
from .progress import progress_display, showing_progress


def register(app: typer.Typer) -> None:
    app.command(help="Summarize FILEs and DIRs ('-' or piped stdin reads stdin). Documents longer than the context "
                     "are read in parts and the parts' notes combined; several documents keep their names.")(summarize)


@handle_errors
@model_options(engine=True)
def summarize(
    files: Annotated[Optional[list[str]], typer.Argument(help="Text files and directories (their text files, "
                                                          "recursively); '-' reads stdin.", show_default=False)] = None,
    words: Annotated[str, typer.Option("--words", "-w", metavar="N",
                                       help=f"Summary length in words (1..{MAX_WORDS}); the summary has at most "
                                            "N×1.25 words, in whole sentences or leading clauses.")] = str(DEFAULT_WORDS),
    style: Annotated[str, typer.Option("--style", help="paragraph or bullets.")] = "paragraph",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, chunks, context, "
                                          "rope_scaling, timings (and part_locations: the pages each part of a "
                                          "paged document covered).")] = False,
    focus: Annotated[Optional[str], typer.Option("--focus", metavar="INSTRUCTION", help="Your own instruction "
                                                 "(\"Summarize the key findings\"): it steers every part's notes and "
                                                 "the combination.")] = None,
    max_input_mb: MaxInputOpt = None,
    batch: Annotated[int, typer.Option("--batch", metavar="N", help="Parts read at once on a model here, decoded "
                                       "together (0: as many as free memory holds). On the CPU's int4 default "
                                       "the kernels round several rows differently, so notes may differ from "
                                       "--batch 1's.")] = 1,
    *, opts: GlobalOptions,
) -> None:
    options = SummaryOptions.build(parse_words(words), style, focus, batch)  # bad values fail before the model loads
    with progress_display() as progress:
        documents, skipped = read_documents(files or [], max_input_bytes(max_input_mb), progress)
    m = load_model(opts)
    with showing_progress(m) as progress:
        summary = summarize_documents(m, documents, options, progress=progress, notify=notice)
    result = summary.to_json()
    if len(documents) > 1 or skipped:
        result["skipped"] = [{"name": name, "why": why} for name, why in skipped]
    else:
        result.pop("documents", None)  # one document: the JSON it always had
    write_answer(json.dumps(result, ensure_ascii=False) if as_json else summary.text)


def parse_words(value: str) -> int | str:
    """--words is parsed here, not by typer, so a non-number gets the same one-line usage error as 0."""
    try:
        return int(value.strip())
    except ValueError:
        return value  # SummaryOptions.build rejects it, naming the option
