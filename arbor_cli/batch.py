"""Batch: several generations decoded together on a model here (continuous batching).

A Batch has `slots` Sessions of one context. A prompt added to it takes a free slot (the one whose
Session shares the longest prefix with it: prefix reuse per slot, by the Session's one rule) and joins
the running sequences at the next `step()`; it leaves when it ends or is cancelled, and its slot is free
at once. Each step is one forward of the backend (`LoadedModel.step_rows`): every running sequence's
last token as a decode row, plus pieces of the prompts still being read (at most `prefill_chunk` prompt
tokens a step, each prompt cut where its own prefill would cut it), then every sequence that got logits
picks, detokenizes and stops by its own options (generate.Decoding: the rules one generation follows).

`Model.stream_many` (the door's call for several prompts) runs prompts through a Batch; `arbor serve
--parallel N` keeps one running and adds requests as they come.

What a row computes differs from the sequence alone only by rounding where the backend's matmuls round
differently for B rows than for one (torch's CPU kernels; MLX on the CPU is bit for bit the same): a
slot's Session therefore counts what a batched step computed as exact only where the backend says row
counts change nothing (`exact_across_row_counts`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from arbor_core.errors import ContextError, UsageError

from .generate import Decoding, GenerationOptions, GenerationResult
from .session import Session, common_prefix


@dataclass(eq=False)
class Sequence:
    """One prompt's generation in a Batch: what is left of its prompt to read, its sampled token waiting to
    be fed, its Decoding (text, stops, budget), and its result once it ended."""

    key: Any
    ids: list[int]
    session: Session
    run: Decoding
    todo: list[int]  # prompt ids still to prefill
    token: int | None = None  # sampled and accepted: the next step feeds it
    t0: float = field(default_factory=time.perf_counter)
    t1: float | None = None  # when its first token was picked
    result: GenerationResult | None = None
    cancelled: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.run.tokens


class Event(NamedTuple):
    """What a step did for one sequence: `text` it released (may be ""), and `result` when it ended."""

    sequence: Sequence
    text: str
    result: GenerationResult | None


class Batch:
    def __init__(self, model, slots: int, context: int, rope: str | None = None):
        if slots < 1:
            raise UsageError(f"a batch needs at least one slot, got {slots}")
        self.model, self.context = model, context
        self.sessions = [Session(model, context, rope) for _ in range(slots)]
        self.running: list[Sequence] = []  # in slot order (add keeps it so)

    @property
    def slots(self) -> int:
        return len(self.sessions)

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    def add(self, prompt: list[int] | list[dict], options: GenerationOptions, key: Any = None) -> Sequence:
        """`prompt` (token ids or chat messages) joins at the next step, in the free slot that holds the most
        of it. ContextError when it cannot fit the slots' context; RuntimeError when no slot is free."""
        model = self.model
        ids = model.tokenizer.encode_chat(prompt, add_generation_prompt=True) if _is_chat(prompt) else \
            model._check_ids(prompt)
        if not ids:
            raise UsageError("the prompt is empty")
        if len(ids) >= self.context:
            raise ContextError(f"the prompt has {len(ids)} tokens but a batch slot holds {self.context}; "
                               "shorten it or raise --context")
        taken = {id(s.session) for s in self.running}
        free = [s for s in self.sessions if id(s) not in taken]
        if not free:
            raise RuntimeError("every slot of the batch is running")
        session = max(free, key=lambda s: common_prefix(s.ids, ids))  # the first of the longest: ties go to the lowest
        model._cache_of(session)
        start = session.reuse(ids)
        run = Decoding(model.lm, model.tokenizer, ids[start:], options, self.context - len(ids))
        # a batched step's rows are not a fresh prefill's: exact only where row counts change nothing (rows=1)
        session.hold(ids, start=start, generated=run.tokens, rows=1)
        sequence = Sequence(key, ids, session, run, ids[start:])
        self.running.append(sequence)
        # in slot order: a step's decode rows then lie in their caches' order (torch attends a pool's rows at once)
        order = {id(s): i for i, s in enumerate(self.sessions)}
        self.running.sort(key=lambda s: order[id(s.session)])
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop `sequence` now: it leaves the batch and its slot is free (its Session keeps what it computed)."""
        if sequence in self.running:
            self.running.remove(sequence)
            sequence.cancelled = True

    def step(self) -> list[Event]:
        """One forward of every running sequence; an Event for each that released text or ended (ended ones
        have left the batch)."""
        rows, stepped, budget = [], [], self.model.prefill_chunk
        for s in self.running:
            if s.token is not None:
                rows.append([s.token])
                stepped.append(s)
        for s in self.running:
            if s.todo and (budget > 0 or not rows):
                n = min(len(s.todo), self.model.prefill_chunk, s.session.cache.max_chunk, max(budget, 1))
                rows.append(s.todo[:n])
                stepped.append(s)
                budget -= n
        if not rows:
            return []
        logits = self.model.lm.step_rows(rows, [s.session.cache for s in stepped])
        events = []
        for i, (s, row) in enumerate(zip(stepped, rows)):
            if s.token is None:  # a prompt's piece
                s.todo = s.todo[len(row):]
                if s.todo:
                    continue
            token = s.run.pick(logits[i])
            if s.t1 is None:
                s.t1 = time.perf_counter()
            text, ended = s.run.accept(token)
            s.token = None if ended else token
            if ended:
                text += s.run.close()
                s.result = s.run.result(len(s.ids) - s.session.reused, s.t0, s.t1, time.perf_counter(),
                                        self.context)
                self.running.remove(s)
            if text or ended:
                events.append(Event(s, text, s.result))
        return events


def _is_chat(prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], dict)
