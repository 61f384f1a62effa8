"""`arbor generate`: raw completion of a prompt, streamed to stdout."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from arbor_core.errors import ArborError

from ..generate import GenerationOptions
from .common import (
    SCHEMA_HELP,
    GlobalOptions,
    handle_errors,
    load_model,
    model_options,
    read_schema,
    read_text_input,
    write_answer,
)


def register(app: typer.Typer) -> None:
    app.command(help="Complete PROMPT (or stdin, with '-' or when piped) without a chat template.")(generate)


@handle_errors
@model_options
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt text; '-' reads stdin.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Makes sampling reproducible.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", help="Discourage repeating the last 64 "
                                                  "tokens (1 = off).")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, tokens, timings.")] = False,
    schema: Annotated[Optional[str], typer.Option("--schema", metavar="FILE|JSON", help=SCHEMA_HELP)] = None,
    *, opts: GlobalOptions,
) -> None:
    options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   stop=stop or None, repetition_penalty=repeat_penalty, schema=read_schema(schema))
    GenerationOptions.build(**options)  # reject bad values before the model loads
    text = prompt if prompt not in (None, "-") else read_text_input(prompt)[0]
    m = load_model(opts)
    stream = m.generate(text, stream=True, **options)
    if as_json:
        for _ in stream:
            pass
        r = stream.result
        write_answer(json.dumps({"text": r.text, "tokens": len(r.tokens), "finish_reason": r.finish_reason,
                                 "context": r.context, "timings": r.timings}))
        incomplete_json(schema, r)
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    write_answer("")
    incomplete_json(schema, stream.result)


def incomplete_json(schema: str | None, result) -> None:
    """With --schema, an answer cut by --max-tokens (or a stop) is not the schema's JSON: say so, exit 1."""
    if schema is not None and result is not None and result.finish_reason != "eos":
        raise ArborError(f"the JSON answer is incomplete: it ended by {result.finish_reason} after "
                         f"{len(result.tokens)} tokens; raise --max-tokens")
