"""`arbor ask DOC QUESTION`: an answer about a document of any length on stdout; progress on stderr."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from arbor_core.errors import UsageError

from ..ask import ask_documents
from .common import (
    GlobalOptions,
    MaxInputOpt,
    handle_errors,
    load_model,
    max_input_bytes,
    model_options,
    read_documents,
    write_answer,
)
from .progress import progress_display, showing_progress


def register(app: typer.Typer) -> None:
    app.command(help="Answer QUESTION about FILE ('-' reads stdin), or about several FILEs and DIRs (text, Markdown, "
                     "PDF, Word, HTML, EPUB; the answer names the document, page or heading its quote is from). A document longer than the model "
                     "reads reliably is asked part by part; an answer is kept only with a quote from its part that "
                     "carries what the question names. Questions for all of something read every part.")(ask)


@handle_errors
@model_options(engine=True)
def ask(
    paths: Annotated[list[str], typer.Argument(help="The text file(s) or director(ies), then the question; '-' "
                                               "reads stdin.", show_default=False, metavar="FILE|DIR... QUESTION")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, path (one pass, parts: the "
                                          "best-ranked parts answered, or every part), parts, read (the parts "
                                          "read: those naming what is asked), tokens, answered "
                                          "(parts), findings (part, answer, quote, start, score, anchored, answers, "
                                          "lacks: what a quote that does not answer lacks; for a document with "
                                          "pages or headings, or several, also document, location and the quote's "
                                          "start/end in that document's text), location (the answer's), cache "
                                          "(parts loaded / prefilled), timings.")] = False,
    every_part: Annotated[bool, typer.Option("--all", help="Read every part naming what is asked and list every answer, as a question "
                                             "for all of something ('what are all', 'list every', 'how many', "
                                             "'which … mention') does anyway.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not keep the document's prefill on disk "
                                           "(nor use a kept one).")] = False,
    part_tokens: Annotated[Optional[int], typer.Option("--part-tokens", metavar="N", help="Read documents longer "
                                                       "than N tokens in parts of N (default: what the model is "
                                                       "measured to read reliably; 1,024 for smollm2-135m-instruct, 8,192 for the Qwen2.5-Coder models).")
                           ] = None,
    max_input_mb: MaxInputOpt = None,
    *, opts: GlobalOptions,
) -> None:
    if len(paths) < 2:
        raise UsageError("give a FILE (or DIR, or '-') and then the QUESTION")
    *sources, question = paths
    with progress_display() as progress:
        documents, _ = read_documents(sources, max_input_bytes(max_input_mb), progress)
    m = load_model(opts)
    with showing_progress(m) as progress:
        answer = ask_documents(m, documents, question, progress=progress, keep=not no_cache, part_tokens=part_tokens,
                               every_part=every_part)
    write_answer(json.dumps(answer.to_json(), ensure_ascii=False) if as_json else answer.text)
