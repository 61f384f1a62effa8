"""`arbor generate`: raw completion of a prompt, streamed to stdout."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..generate import GenerationOptions
from .common import GlobalOptions, handle_errors, load_model, model_options, read_text_input, write_answer


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
    *, opts: GlobalOptions,
) -> None:
    options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   stop=stop or None, repetition_penalty=repeat_penalty)
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
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    write_answer("")
