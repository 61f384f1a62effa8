"""How a long run (summarize, ask) tells a display where it is: a phase begins with its number of
steps, then each step advances it. The CLI draws it (cli/progress.py); a library caller may pass
nothing and get NoProgress."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What a display implements to follow a run (the CLI draws a progress bar with it)."""

    def begin(self, phase: str, total: int) -> None: ...
    def advance(self) -> None: ...


class NoProgress:
    """Progress that shows nothing."""

    def begin(self, phase: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass
