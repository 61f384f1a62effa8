"""Where KV entries live and which keys a query sees: the arithmetic every backend's cache shares.

A cache holds `slots` entries per layer. Normally slots = capacity (the context); a sliding-window
model may keep fewer, as a ring where position p lives in slot p % slots: memory is then bounded by
the window, not the context. These functions hold the rules of that layout and of the attention
mask; the backends only move tensors. They take plain ints, and the ones marked so take arrays too
(numpy, torch, MLX), using operators only, so a backend passes its device arrays without copying
them to the host.
"""

from __future__ import annotations


def cache_slots(capacity: int, slots: int | None = None) -> int:
    """Entries per layer for a cache of `capacity` positions (slots: what the planner allows, None = all)."""
    return min(capacity, slots or capacity)


def max_chunk(capacity: int, slots: int, window: int | None) -> int:
    """The most tokens one forward may write so that every query still sees its whole window.

    A ring overwrites the oldest slots as it writes, so a chunk of T queries needs window + T - 1 slots.
    """
    return slots if slots == capacity else slots - window + 1


def per_layer(value, n_layers: int) -> list:
    """A cache option given once for every layer, or already one per layer (Gemma: windowed and global layers)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n_layers


def layers_max_chunk(capacity: int, slots: list[int], windows: list[int | None]) -> int:
    """max_chunk of a cache whose layers hold different slots: the least any layer allows."""
    return min(max_chunk(capacity, s, w) for s, w in zip(slots, windows))


def layers_kept_length(requested: int, length: int, windows: list[int | None], oldest: list[int]) -> int:
    """kept_length of a cache whose layers have their own windows and rings: what every layer can keep."""
    return min(kept_length(requested, length, w, o) for w, o in zip(windows, oldest))


def write_spans(start: int, count: int, slots: int) -> list[tuple[int, int, int, int]]:
    """Where a write of `count` tokens at positions [start, start + count) goes.

    (first slot, end slot, first token, end token) pieces: one, or two when the write wraps past the
    last slot (the rest continues at slot 0).
    """
    if count > slots:
        raise ValueError(f"a chunk of {count} tokens does not fit a {slots}-slot cache")
    first = start % slots
    n = min(count, slots - first)
    spans = [(first, first + n, 0, n)]
    if n < count:
        spans.append((0, count - n, n, count))
    return spans


def oldest_held(oldest: int, end: int, slots: int) -> int:
    """The oldest position still held after a write that ended at `end` (positions [oldest, end) are held)."""
    return max(oldest, end - slots)


def slot_positions(slot, end: int, slots: int):
    """The position each slot holds after writes up to `end`: the last p ≡ slot (mod slots) below end.

    `slot` is an int or an array of slot indices (arange(slots)); once the ring wrapped (end > slots)
    every slot holds one.
    """
    return slot + slots * ((end - 1 - slot) // slots)


def first_visible_key(query: int, window: int | None) -> int:
    """The oldest position a query at `query` attends to."""
    return 0 if window is None else max(0, query - window + 1)


def window_cuts_in(window: int | None, last_query: int, first_key: int) -> bool:
    """Whether the window hides a key at or after `first_key` from the query at `last_query`.

    When it does not, plain causal masking is all attention needs.
    """
    return window is not None and last_query - window >= first_key


def kept_length(requested: int, length: int, window: int | None, oldest: int) -> int:
    """How many positions a cache of `length` valid ones keeps when truncated to `requested`.

    A ring may have overwritten keys the query at the kept length still needs (its window reaches
    back before `oldest`, the oldest position held): then it keeps nothing (0), and callers see from
    the length that they must prefill again from the start.
    """
    kept = max(0, min(requested, length))
    if kept and window is not None and first_visible_key(kept, window) < oldest:
        return 0
    return kept


def visible(query_pos, key_pos, window: int | None):
    """(queries, keys) booleans: a key is visible when it is not in the future and within the window.

    query_pos (q,) and key_pos (k,) are arrays of absolute positions (any array type with numpy-style
    indexing and comparison operators).
    """
    q, k = query_pos[:, None], key_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window  # in place where the array type allows it (torch, numpy)
    return allowed
