"""Work mapped over items, results in the items' order: one at a time, or several at once in threads
(an engine answers `--parallel N` requests at once). The doors' `map` is this function."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple


class BatchEvent(NamedTuple):
    """One event of a door's stream_many: prompt `index` released `text` (may be ""); `result` (its
    GenerationResult) on the last event of that index."""

    index: int
    text: str
    result: Any = None


def map_in_order(work: Callable[[Any], Any], items: Iterable[Any], on_done: Callable[[], None] | None = None,
                 at_once: int = 1) -> Iterator[Any]:
    """work(item) for every item, yielded in order; `on_done()` after each. One at a time, each item's
    work starts only when the previous result was taken (a reader holds one part's cache at a time)."""
    items = list(items)

    def one(item):
        result = work(item)
        if on_done is not None:
            on_done()
        return result

    if at_once == 1 or len(items) < 2:
        yield from (one(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        yield from pool.map(one, items)


def stream_each(door, prompts: list, options, *, context: int | None = None, rope: str | None = None,
                parallel: int | None = None) -> Iterator[BatchEvent]:
    """stream_many for a door that runs generations as whole requests (an engine, the tests' fake): each
    prompt streamed by door.stream through door.map (an engine's `--parallel` requests at once), its events
    given when it is done, in the prompts' order."""
    each = list(options) if isinstance(options, (list, tuple)) else [options] * len(prompts)

    def whole(i: int) -> list[BatchEvent]:
        stream = door.stream(prompts[i], each[i], context=context, rope=rope)
        events = [BatchEvent(i, piece) for piece in stream]
        return events + [BatchEvent(i, "", stream.result)]

    for events in door.map(whole, range(len(prompts))):
        yield from events
