"""What an install tells the user while it works: always on stderr, never on stdout.

stdout belongs to the model's answer (`arbor run … > out.txt` must stay clean), so progress goes
to a stderr Console: a rich bar when stderr is a terminal, one plain line per stage when it is
not (a log file gets a record, not a stream of carriage returns), nothing at all when quiet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

Advance = Callable[[int], None]


def _ignore(_: int) -> None:
    pass


class Reporter:
    """Progress for one install; `stage()` is a context manager that yields an `advance(n)` callable."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True)

    @property
    def live(self) -> bool:
        return not self.quiet and self.console.is_terminal

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"arbor: {message}", highlight=False, markup=False, soft_wrap=True)  # one line

    @contextmanager
    def stage(self, description: str, *, total: int | None = None, unit: str = "items") -> Iterator[Advance]:
        if not self.live:
            self.note(description)
            yield _ignore
            return
        amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), amount,
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)
            if total is not None:
                progress.update(task, completed=total)
