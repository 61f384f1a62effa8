"""`arbor ask DOC QUESTION`: an answer about a document of any length on stdout; progress on stderr."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..ask import ask as ask_document
from .common import GlobalOptions, MaxInputOpt, handle_errors, load_model, max_input_bytes, model_options, read_text_input, write_answer
from .summarize import progress_display


def register(app: typer.Typer) -> None:
    app.command(help="Answer QUESTION about FILE ('-' reads stdin). A document longer than the model reads "
                     "reliably is asked part by part; an answer is kept only with a quote from its part.")(ask)


@handle_errors
@model_options(engine=True)
def ask(
    file: Annotated[str, typer.Argument(help="The text file; '-' reads stdin.", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, path (one pass or parts), "
                                          "parts, tokens, answered (parts), findings (part, answer, quote, start, "
                                          "score, anchored), cache (parts loaded / prefilled), timings.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not keep the document's prefill on disk "
                                           "(nor use a kept one).")] = False,
    part_tokens: Annotated[Optional[int], typer.Option("--part-tokens", metavar="N", help="Read documents longer "
                                                       "than N tokens in parts of N (default: what the model is "
                                                       "measured to read reliably; 1,024 for the default model).")
                           ] = None,
    max_input_mb: MaxInputOpt = None,
    *, opts: GlobalOptions,
) -> None:
    text, _ = read_text_input(file, max_input_bytes(max_input_mb))
    m = load_model(opts)
    with progress_display() as progress:
        answer = ask_document(m, text, question, progress=progress, keep=not no_cache, part_tokens=part_tokens)
    write_answer(json.dumps(answer.to_json(), ensure_ascii=False) if as_json else answer.text)
