"""Progress on stderr while a long command runs (summarize, ask, chat about a document): a rich bar
per phase on a terminal, plain lines off one. Both follow arbor_cli/progress.py's Progress, and show
the tokens a long prefill has read (Model.on_prefill) beside the phase. Off a terminal a line comes at
least every plain_progress_seconds() (common.py) while the command works (a heartbeat thread), so a pipe or a log never
goes quiet for minutes (issue 32: a one-pass `arbor ask` in a pipe printed nothing for 276 s)."""

from __future__ import annotations

import contextlib
import threading
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import console, notice, plain_progress_seconds



class ProgressBar:
    """rich progress on stderr, one bar per phase (reading the document, reading the parts, combining
    the notes), with ETA; off a terminal (a pipe, a log) plain lines instead (PlainProgress)."""

    def __init__(self):
        self.progress = Progress(TextColumn("[dim]arbor:[/dim] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.task, self.phase = None, ""

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.stop()
        return False

    def begin(self, phase: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.task, self.phase = self.progress.add_task(phase, total=total), phase

    def advance(self) -> None:
        self.progress.advance(self.task)

    def tokens(self, done: int, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.phase} · {done:,}/{total:,} tokens read"
                                 if done < total else self.phase)


class PlainProgress:
    """Progress as plain lines on stderr for when it is not a terminal: one as each phase begins, then
    about one every `every` seconds — the step and the tokens of a prefill read, or, while neither moves,
    that it is still working (a heartbeat thread) — and one as the phase completes, each with the time left."""

    def __init__(self, every: float | None = None, clock=time.monotonic, heartbeat: bool = True):
        self.every, self.clock = plain_progress_seconds() if every is None else every, clock
        self.phase, self.total, self.done, self.started, self.shown = "", 0, 0, 0.0, clock()
        self.reading: tuple[int, int] | None = None  # a prefill's tokens read, of its total
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = (threading.Thread(target=self._beat, daemon=True, name="arbor-progress")
                       if heartbeat and self.every > 0 else None)

    def __enter__(self) -> "PlainProgress":
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join()
        return False

    def begin(self, phase: str, total: int) -> None:
        with self.lock:
            self.phase, self.total, self.done, self.reading = phase, total, 0, None
            self.started = self.shown = self.clock()
            notice(f"{phase}: 0/{total}")

    def advance(self) -> None:
        with self.lock:
            self.done += 1
            self.reading = None
            now = self.clock()
            if self.done < self.total and now - self.shown < self.every:
                return
            self._say(now)

    def tokens(self, done: int, total: int) -> None:
        """A prefill's tokens read: said at once for its first chunk (the prefill is announced), then with the
        phase's rate."""
        with self.lock:
            first = self.reading is None
            self.reading = (done, total) if done < total else None
            if self.reading is not None and (first or self.clock() - self.shown >= self.every):
                self._say(self.clock())

    def _say(self, now: float) -> None:
        self.shown = now
        elapsed = now - self.started
        line = f"{self.phase}: {self.done}/{self.total}" if self.phase else "working"
        if self.reading is not None:
            line += f" · {self.reading[0]:,}/{self.reading[1]:,} tokens read"
        line += f" · {_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            line += f", about {_duration(elapsed / self.done * (self.total - self.done))} left"
        notice(line)

    def _beat(self) -> None:
        """A line when nothing has been said for `every` seconds, while the command works."""
        while not self.stop.wait(min(1.0, max(self.every / 4, 0.05))):
            with self.lock:
                if self.clock() - self.shown >= self.every:
                    self._say(self.clock())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_display():
    """The display for this stderr: a bar on a terminal, plain lines off one."""
    return ProgressBar() if console.is_terminal else PlainProgress()


@contextlib.contextmanager
def showing_progress(model):
    """progress_display(), with `model`'s prefills saying their tokens read to it while it is shown."""
    with progress_display() as progress:
        before = getattr(model, "on_prefill", None)
        model.on_prefill = progress.tokens
        try:
            yield progress
        finally:
            model.on_prefill = before
