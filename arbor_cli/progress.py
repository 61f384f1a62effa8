"""How a long run (summarize, ask) tells a display where it is: a phase begins with its number of
steps, then each step advances it; within a step, a long prefill says how many of its tokens are read
(`tokens`, through Model.on_prefill). The CLI draws it (cli/progress.py); a library caller may pass
nothing and get NoProgress."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What a display implements to follow a run (the CLI draws a progress bar with it)."""

    def begin(self, phase: str, total: int) -> None: ...
    def advance(self) -> None: ...
    def tokens(self, done: int, total: int) -> None: ...


class NoProgress:
    """Progress that shows nothing."""

    def begin(self, phase: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def tokens(self, done: int, total: int) -> None:
        pass
