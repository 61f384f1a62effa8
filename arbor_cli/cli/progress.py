"""Progress on stderr while a long command runs (summarize, ask, chat about a document): a rich bar
per phase on a terminal, plain lines off one. Both follow arbor_cli/progress.py's Progress."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import console, notice

PLAIN_PROGRESS_SECONDS = 10.0  # off a terminal, a progress line at most this often within a phase


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

    def __init__(self, every: float | None = None, clock=time.monotonic):
        self.every, self.clock = PLAIN_PROGRESS_SECONDS if every is None else every, clock
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
    """The display for this stderr: a bar on a terminal, plain lines off one."""
    return ProgressBar() if console.is_terminal else PlainProgress()
