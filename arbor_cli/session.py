"""Session: a long-lived context on a door — a chat's conversation, serve's last request, a document
ask reads — holding what it was given so that the next prompt runs only what it does not hold yet.

On a model loaded here a session owns a KV cache (made on first use) and the token ids whose keys and
values it holds; on an engine it holds only the ids (the server keeps its own cache). The door does the
work (`door.stream(prompt, options, session=s)`, `door.score_prompt(ids, s)`, `door.prefill(ids, s)`);
the session keeps the books and the one prefix-reuse rule:

    A new prompt reuses the longest prefix it shares with what the session holds, up to one token
    short of the prompt (its last token is run for the next logits), but only the positions that were
    computed exactly as a fresh run of the new prompt would compute them. A fresh run prefills in
    chunks of `prefill_chunk` from position 0, so a position is exact when it was computed inside a
    whole chunk aligned to position 0 and everything before it is exact; positions computed by a
    partial chunk or by decode steps are not. The reused length is therefore rounded down to whole
    chunks, and never reaches past the first position that was not computed that way: a turn whose
    prompt ended at 700 and whose reply went on to 1,100 leaves [512, 1024) inexact, though it lies
    in whole chunks, because a fresh run computes it as one chunk of 512 rows.

Where the backend computes a position the same whatever the row count (`exact_across_row_counts`,
measured per backend: MLX on the CPU), every position is exact and the grain is one token: any common
prefix is reused, and a chat turn prefills only its own tokens. Elsewhere (torch, whose CPU kernels
round differently for 30 rows than for 512) a turn re-prefills what lies after the last whole chunk of
the previous prompt: up to prefill_chunk - 1 tokens of it, plus the previous reply and the new message.

A prompt that `continues` the request whose start the session holds (ask scores the question after a
document, then answers from the prompt's last token) keeps all of it: that is how the request runs,
fresh or not.
"""

from __future__ import annotations

from typing import Any


class Session:
    def __init__(self, door, context: int, rope: str | None = None):
        self.door, self.context, self.rope = door, context, rope
        self.cache: Any = None  # a local door's KV cache (door makes it on first use); None on an engine
        self.grain = 1  # the reuse rule's unit: the prefill chunk, or 1 where row counts change nothing
        self.reused = 0  # tokens the latest prompt took from what the session held
        self._ids: list[int] = []
        self._exact = 0  # the leading positions of _ids computed as a fresh run computes them
        self._running: tuple | None = None  # the latest generation: prompt, its tokens so far, whether decodes are exact

    # ---- what it holds -----------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """The token ids the session holds, in order."""
        self._settle()
        return self._ids

    def tokens_used(self) -> int:
        return len(self.ids)

    def clear(self) -> None:
        """Hold nothing (the cache is kept, emptied: its buffers are reused)."""
        self._running, self._ids, self._exact = None, [], 0
        if self.cache is not None:
            self.cache.truncate(0)

    def adopt(self, cache, ids: list[int]) -> None:
        """Take a cache made elsewhere (the disk's copy of a document's prefill) holding `ids`. None of it
        counts as exact: how it was computed is not known here."""
        self.cache, self._ids, self._exact, self._running = cache, list(ids), 0, None

    def hold(self, ids: list[int], *, start: int, generated: list[int] | None = None, rows: int | None = None) -> None:
        """Book-keeping after the door ran ids[start:] behind the first `start` ids it held, in prefill steps
        of `rows` (default: the grain), then decodes into `generated` (a list the generation fills as it
        goes, so a reply stopped early, even by Ctrl-C, still leaves the books right)."""
        rows = self.grain if rows is None else rows
        aligned = start <= self._exact and start % self.grain == 0 and rows % self.grain == 0
        # from an exact, aligned start, whole chunks are exact; so are decode steps where the grain is 1
        self._exact = start + (len(ids) - start) // self.grain * self.grain if aligned else min(self._exact, start)
        self._ids = list(ids)
        self._running = (self._ids, generated, aligned and self.grain == 1) if generated is not None else None

    def _settle(self) -> None:
        """The books after the latest generation, however far it got (the cache's length says: positions
        below it are always complete)."""
        if self._running is not None:
            prompt, generated, decodes_exact = self._running
            held = len(prompt) + len(generated)
            if self.cache is not None:
                held = min(held, self.cache.length)
            self._ids = (prompt + generated)[:held]
            if decodes_exact:
                self._exact = held
        self._exact = min(self._exact, len(self._ids))

    # ---- the reuse rule ----------------------------------------------------------------------
    def reuse(self, ids: list[int], continuing: bool = False) -> int:
        """How many leading ids of the prompt `ids` the session keeps (see the module's rule), its cache
        cut to them; the rest is for the door to run."""
        self._settle()
        self._running = None
        same = 0
        for a, b in zip(self._ids, ids):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # always run at least one token to get the next logits
        if not continuing:
            same = min(same, self._exact) // self.grain * self.grain
        if self.cache is not None:
            self.cache.truncate(same)
            # the cache may keep less than asked: a sliding-window ring that has overwritten keys the
            # next position needs keeps nothing, and the whole prompt is run again
            same = self.cache.length
        self._ids, self._exact = self._ids[:same], min(self._exact, same)
        self.reused = same
        return same

    # ---- what serve's worker and the readers call ----------------------------------------------
    def stream(self, prompt: list[int] | list[dict], options, *, continuing: bool = False):
        """The reply to `prompt` (the whole conversation) reusing what the session holds: a GenerationStream."""
        return self.door.stream(prompt, options, session=self, continuing=continuing)

    def score(self, ids: list[int]) -> list[float]:
        """log p of each of ids[1:] given what the session holds and the ids before it; ids are then held."""
        return self.door.score_prompt(ids, self)

    def prefill(self, ids: list[int]) -> None:
        """Hold `ids` after what the session holds, answering nothing."""
        self.door.prefill(ids, self)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids `a` and `b` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
