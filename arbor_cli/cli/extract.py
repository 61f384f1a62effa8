"""`arbor extract FILE|DIR... --schema S.json`: grounded records of a JSON schema from documents of any length,
as one JSON object (or JSONL) on stdout; progress on stderr."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..extract_records import MAX_ITEM_TOKENS, extract_records, items_schema
from .common import (
    GlobalOptions,
    MaxInputOpt,
    handle_errors,
    load_model,
    max_input_bytes,
    model_options,
    read_documents,
    read_schema,
    write_answer,
)
from .progress import progress_display, showing_progress


def register(app: typer.Typer) -> None:
    app.command(help="Pull every record of a JSON schema (the item type) out of FILEs and DIRs ('-' reads stdin; "
                     "text, Markdown, PDF, Word, HTML, EPUB), part by part. An item is kept only when its text "
                     "fields (or its \"quote\" field) and numbers occur verbatim in the part it came from; each "
                     "kept item carries _source (document, page or heading, start/end). Prints {\"items\", "
                     "\"dropped\", \"parts\", \"merged\", \"cache\"}, or one item a line with --jsonl. With --engine URL the parts "
                     "go to that server, --parallel N at once, each held to the schema by its response_format.")(extract)


@handle_errors
@model_options(engine=True)
def extract(
    paths: Annotated[list[str], typer.Argument(help="The file(s) or director(ies); '-' reads stdin.",
                                               show_default=False, metavar="FILE|DIR...")],
    schema: Annotated[str, typer.Option("--schema", metavar="FILE|JSON", help="The JSON schema of one item: "
                                        "an object with properties (a file or JSON text).")],
    instruction: Annotated[Optional[str], typer.Option("--instruction", metavar="TEXT", help="What to extract, "
                                                       "in words, said to the model with each part.")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One item a line (JSON Lines) instead of one object.")
                     ] = False,
    part_tokens: Annotated[Optional[int], typer.Option("--part-tokens", metavar="N", help="Read documents in "
                                                       "parts of N tokens (default: what the model is measured "
                                                       "to read reliably, as arbor ask).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens of answer per part at most.")
                          ] = MAX_ITEM_TOKENS,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not keep the parts' prefill on disk (nor use a "
                                           "kept one), as arbor ask.")] = False,
    max_input_mb: MaxInputOpt = None,
    *, opts: GlobalOptions,
) -> None:
    text = read_schema(schema)
    items_schema(text)  # a bad schema is one line before any document is read or model loaded
    with progress_display() as progress:
        documents, _ = read_documents(paths, max_input_bytes(max_input_mb), progress)
    m = load_model(opts)
    with showing_progress(m) as progress:
        result = extract_records(m, documents, text, instruction=instruction, progress=progress,
                                 part_tokens=part_tokens, max_new_tokens=max_tokens, keep=not no_cache)
    if jsonl:
        for item in result.items:
            write_answer(json.dumps(item, ensure_ascii=False))
    else:
        write_answer(json.dumps(result.to_json(), ensure_ascii=False))
