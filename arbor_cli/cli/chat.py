"""`arbor chat`: an interactive REPL on a terminal, one reply for piped stdin."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from arbor_core.errors import ArborError, UsageError

from ..chat import ChatSession, new_session
from ..generate import GenerationOptions
from .generate import incomplete_json
from .common import (
    SCHEMA_HELP,
    GlobalOptions,
    console,
    describe_error,
    handle_errors,
    load_model,
    max_input_bytes,
    model_options,
    read_document,
    read_schema,
    read_text_input,
    stdin_is_piped,
    write_answer,
)

HELP = """\
/help           this help
/reset          forget the conversation (keeps the system prompt)
/system [TEXT]  show or set the system prompt (resets the conversation)
/context        tokens used of the context limit
/save FILE      save the conversation as JSON
/load FILE      load a saved conversation
/exit           leave (or Ctrl-D)
Start a multi-line message with \"\"\" and end it with \"\"\" on its own line. Ctrl-C stops a reply."""


def register(app: typer.Typer) -> None:
    app.command(help="Chat with the model: a REPL on a terminal; piped stdin is one message, the reply goes to stdout.")(
        chat)


@handle_errors
@model_options(engine=True)
def chat(
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest reply, in tokens.")] = 1024,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", help="Discourage repeating the last 64 "
                                                  "tokens (1 = off).")] = 1.1,
    doc: Annotated[Optional[str], typer.Option("--doc", metavar="FILE", help="Every message is a question about "
                                               "FILE, answered as `arbor ask` does (its cache kept on disk).")] = None,
    schema: Annotated[Optional[str], typer.Option("--schema", metavar="FILE|JSON", help=SCHEMA_HELP + " With --doc: "
                                                  "the type of one record; each message says what to extract, and "
                                                  "the answer is the document's grounded records, as arbor extract "
                                                  "prints them.")] = None,
    *, opts: GlobalOptions,
) -> None:
    options = GenerationOptions.build(max_tokens, temperature, top_p, top_k, seed, repetition_penalty=repeat_penalty,
                                      schema=None if doc is not None else read_schema(schema))
    if doc is not None:
        chat_about(doc, opts, read_schema(schema))
        return
    if stdin_is_piped():
        text, _ = read_text_input("-")
        m = load_model(opts)
        session = new_session(m, system=system, options=options)
        reply = "".join(session.send(text.strip()))
        write_answer(reply.strip())
        incomplete_json(schema, session.last_result)
        return
    m = load_model(opts)
    session = new_session(m, system=system, options=options)
    console.print(f"[dim]arbor chat · {escape(m.checkpoint.name)} · {m.backend}/{m.device} · context {session.context} · "
                  "/help for commands, Ctrl-D to exit[/dim]")
    repl(session)


def chat_about(doc: str, opts: GlobalOptions, schema: str | None = None) -> None:
    """`chat --doc FILE`: each message (piped stdin: the one message) is a question about FILE; with a schema,
    an instruction saying what to extract, answered with FILE's grounded records of that type (arbor extract's
    JSON; the parts' prefill is cached on disk, so every message after the first prefills only itself)."""
    from ..ask import ask_documents
    from ..extract_records import extract_records, items_schema
    from .progress import progress_display, showing_progress

    if schema is not None:
        if schema == "json_object":
            raise UsageError("--doc needs a record's schema (an object with properties), not json_object")
        items_schema(schema)  # a bad schema is one line before the document is read or the model loaded
    with progress_display() as progress:
        document = read_document(doc, max_input_bytes(), progress)
    question = read_text_input("-")[0].strip() if stdin_is_piped() else None
    m = load_model(opts)

    def answer(q: str) -> str:
        with showing_progress(m) as progress:
            if schema is not None:
                found = extract_records(m, [document], schema, instruction=q, progress=progress)
                return json.dumps(found.to_json(), ensure_ascii=False)
            return ask_documents(m, [document], q, progress=progress).text

    if question is not None:
        write_answer(answer(question))
        return
    console.print(f"[dim]arbor chat about {escape(doc)} · {escape(m.checkpoint.name)} · every message is a question "
                  "about the document · Ctrl-D to exit[/dim]")
    for line in messages("(Ctrl-D to leave)"):
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if line.strip():
            try:
                sys.stdout.write(answer(line.strip()) + "\n")
                sys.stdout.flush()
            except KeyboardInterrupt:
                console.print("[dim](question stopped)[/dim]")
            except ArborError as e:
                console.print(f"arbor: error: {describe_error(e)}", markup=False)


def messages(leave_hint: str):
    """The REPL's messages until Ctrl-D; a Ctrl-C at the prompt prints `leave_hint` and asks again."""
    while True:
        try:
            yield read_message()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print(f"\n[dim]{leave_hint}[/dim]")


def repl(session: ChatSession) -> None:
    for line in messages("(Ctrl-D or /exit to leave)"):
        if not line.strip():
            continue
        if line.startswith("/"):
            if run_slash_command(session, line.strip()) == "exit":
                return
            continue
        stream_reply(session, line)


def read_message() -> str:
    console.print("[bold green]>>>[/bold green] ", end="")
    first = input()
    if not first.strip().startswith('"""'):
        return first
    lines = [first.strip()[3:]]
    while True:
        console.print("[dim]...[/dim] ", end="")
        line = input()
        if line.strip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(line)


def stream_reply(session: ChatSession, text: str) -> None:
    try:
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        console.print("[dim](reply stopped)[/dim]")
    except ArborError as e:
        console.print(f"arbor: error: {describe_error(e)}", markup=False)
    sys.stdout.flush()


def run_slash_command(session: ChatSession, line: str) -> str | None:
    command, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if command in ("/exit", "/quit", "/bye"):
            return "exit"
        if command == "/help":
            console.print(HELP, markup=False)
        elif command == "/reset":
            session.reset()
            console.print("[dim]conversation cleared[/dim]")
        elif command == "/system":
            if arg:
                session.set_system(arg)
                session.reset()
                console.print("[dim]system prompt set; conversation cleared[/dim]")
            else:
                console.print(session.system or "(no system prompt: the model's default applies)", markup=False)
        elif command == "/context":
            used = session.tokens_used()
            console.print(f"{used} of {session.context} tokens used ({100 * used / session.context:.1f}%)")
        elif command == "/save" and arg:
            session.save(arg)
            console.print(f"[dim]saved {len(session.turns)} messages to {escape(arg)}[/dim]", markup=True)
        elif command == "/load" and arg:
            session.load(arg)
            console.print(f"[dim]loaded {len(session.turns)} messages from {escape(arg)}[/dim]", markup=True)
        else:
            console.print(f"unknown command {line!r}; /help lists them", markup=False)
    except (ArborError, OSError) as e:
        console.print(f"arbor: error: {describe_error(e)}", markup=False)
    return None
