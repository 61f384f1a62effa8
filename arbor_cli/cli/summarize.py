"""`arbor summarize`: a summary of FILE (or stdin) on stdout; progress, notices and errors on stderr."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..summarize import DEFAULT_WORDS, MAX_WORDS, SummaryOptions, summarize_documents
from .common import (
    GlobalOptions,
    MaxInputOpt,
    console,
    handle_errors,
    load_model,
    max_input_bytes,
    model_options,
    notice,
    read_documents,
    write_answer,
)


PLAIN_PROGRESS_SECONDS = 10.0  # off a terminal, a progress line at most this often within a phase


def register(app: typer.Typer) -> None:
    app.command(help="Summarize FILEs and DIRs ('-' or piped stdin reads stdin). Documents longer than the context "
                     "are read in parts and the parts' notes combined; several documents keep their names.")(summarize)


@handle_errors
@model_options(engine=True)
def summarize(
    files: Annotated[Optional[list[str]], typer.Argument(help="Text files and directories (their text files, "
                                                          "recursively); '-' reads stdin.", show_default=False)] = None,
    words: Annotated[str, typer.Option("--words", "-w", metavar="N",
                                       help=f"Longest summary, in words (1..{MAX_WORDS}).")] = str(DEFAULT_WORDS),
    style: Annotated[str, typer.Option("--style", help="paragraph or bullets.")] = "paragraph",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, chunks, context, "
                                          "rope_scaling, timings.")] = False,
    focus: Annotated[Optional[str], typer.Option("--focus", metavar="INSTRUCTION", help="Your own instruction "
                                                 "(\"Summarize the key findings\"): it steers every part's notes and "
                                                 "the combination.")] = None,
    max_input_mb: MaxInputOpt = None,
    *, opts: GlobalOptions,
) -> None:
    options = SummaryOptions.build(parse_words(words), style, focus)  # bad values fail before the model loads
    documents, skipped = read_documents(files or [], max_input_bytes(max_input_mb))
    m = load_model(opts)
    with progress_display() as progress:
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


class ProgressBar:
    """rich progress on stderr, one bar per phase (reading the document, reading the parts, combining
    the notes), with ETA; off a terminal (a pipe, a log) plain lines instead (PlainProgress)."""

    def __init__(self):
        self.progress = Progress(TextColumn("[dim]arbor:[/dim] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.task = None

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.stop()
        return False

    def begin(self, phase: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.task = self.progress.add_task(phase, total=total)

    def advance(self) -> None:
        self.progress.advance(self.task)


class PlainProgress:
    """Progress as plain lines on stderr for when it is not a terminal: one as each phase begins, then
    at most one every `every` seconds, and one as the phase completes, each with the time left."""

    def __init__(self, every: float = PLAIN_PROGRESS_SECONDS, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.phase, self.total, self.done, self.started, self.shown = "", 0, 0, 0.0, 0.0

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def begin(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.started = self.shown = self.clock()
        notice(f"{phase}: 0/{total}")

    def advance(self) -> None:
        self.done += 1
        now = self.clock()
        if self.done < self.total and now - self.shown < self.every:
            return
        self.shown = now
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done)
        notice(f"{self.phase}: {self.done}/{self.total} · {_duration(elapsed)} elapsed"
               + (f", about {_duration(left)} left" if self.done < self.total else ""))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_display():
    return ProgressBar() if console.is_terminal else PlainProgress()
