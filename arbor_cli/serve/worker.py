"""The one thread that runs `arbor serve`'s generations: a bounded queue of Jobs, each cancelled between
two tokens when its client goes away.

`Worker` (--parallel 1) runs them one at a time in arrival order and keeps the last request's Session
(arbor_cli/session.py): a prompt that extends what it holds runs only what the session's one prefix-reuse
rule cannot keep, so the answer is the one a fresh request gets. `BatchWorker` (--parallel N) keeps a
Batch of N slots (arbor_cli/batch.py) running: a waiting request joins at the next step, leaves when done,
and a request whose client went away leaves at the next step, its slot free; each slot keeps its Session
for the prefix of the next request it takes. The queue (and its 503) is for requests beyond the N.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from arbor_core.errors import ArborError, ContextError, UsageError

from ..generate import GenerationOptions
from .openai import RequestError

DEFAULT_QUEUE = 16  # requests waiting beside the one running; more are refused with 503


@dataclass
class Job:
    """One request's work, handed from the HTTP side to the worker; events come back on `events`."""

    ids: list[int]
    options: GenerationOptions
    context: int
    loop: asyncio.AbstractEventLoop
    kind: str = "generate"  # or "score": the prompt's own log-probabilities (completions' echo + logprobs)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event to the request's event loop: ("piece", text), ("scored", log p's), ("done", result
        or None when cancelled) or ("error", RequestError)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker(threading.Thread):
    """Runs jobs one at a time, keeping the last cache for the next request's common prefix."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE):
        super().__init__(name="arbor-serve-worker", daemon=True)
        self.model = model
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.session = None  # the last request's, kept for the next one's common prefix
        self.busy = False
        self.current: Job | None = None  # the job running now
        self.stopping = False  # set by stop(): every job from now on is cancelled
        self.counts = {"served": 0, "cancelled": 0, "refused": 0, "failed": 0, "reused_tokens": 0}

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counts["refused"] += 1
            raise RequestError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                               "retry later", "server_overloaded", code="queue_full") from None

    def stop(self) -> None:
        """Cancel the running job and every waiting one (the server is shutting down): each stops between two
        tokens and its client hears the end at once. Safe from a signal handler: it only sets flags."""
        self.stopping = True
        current = self.current
        if current is not None:
            current.cancelled.set()
        for job in list(self.jobs.queue):
            job.cancelled.set()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if self.stopping:
                job.cancelled.set()
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                job.emit("done", None)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        """One job, its failure told to its client as an error event (the server stays up)."""
        self.busy, self.current = True, job
        try:
            if job.kind == "score":
                job.emit("scored", self._score(job))
                job.emit("done", None)
            else:
                self._generate(job)
        except ArborError as e:
            self.counts["failed"] += 1
            job.emit("error", RequestError(400 if isinstance(e, (ContextError, UsageError)) else 500, str(e)))
        except Exception as e:  # noqa: BLE001  the server stays up; the client hears what broke
            self.counts["failed"] += 1
            job.emit("error", RequestError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        finally:
            self.busy, self.current = False, None

    def _generate(self, job: Job) -> None:
        session = self._session_for(job.context)
        stream = session.stream(job.ids, job.options)
        self.counts["reused_tokens"] += session.reused
        for piece in stream:
            if job.cancelled.is_set():
                break
            job.emit("piece", piece)
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.emit("done", None)
            return
        self.counts["served"] += 1
        job.emit("done", stream.result)

    def _score(self, job: Job) -> list[float | None]:
        """log p of each prompt token given the ones before it (None for the first: nothing precedes it)."""
        session = self._session_for(job.context)
        session.clear()
        scored = session.score(job.ids)
        self.counts["served"] += 1
        return [None, *scored]

    def _session_for(self, context: int):
        """The session held when it has `context` positions, else a new one (the old one's cache goes first)."""
        if self.session is None or self.session.context != context:
            self.session = None
            self.session = self.model.session(context)
        return self.session


class BatchWorker(Worker):
    """Runs up to `parallel` generations at once, one batched step per token (arbor_cli/batch.py), in slots of
    `context` tokens. Scoring requests run between two steps, alone."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE, *, parallel: int, context: int):
        super().__init__(model, queue_size)
        self.parallel, self.context = parallel, context
        self.batch = model.batch(parallel, context)
        self.jobs_of: dict[int, Job] = {}  # id(sequence) -> its job

    @property
    def running(self) -> int:
        return len(self.batch.running)

    def stop(self) -> None:
        self.stopping = True
        for job in list(self.jobs_of.values()) + list(self.jobs.queue):
            job.cancelled.set()

    def run(self) -> None:
        while True:
            self._take(block=not self.batch.running)
            self._drop_cancelled()
            self.busy = bool(self.batch.running)  # a batch whose last sequence just left is idle now
            if not self.busy:
                continue
            try:
                events = self.batch.step()
            except Exception as e:  # noqa: BLE001  the server stays up; every running client hears what broke
                self._fail_all(e)
                continue
            for event in events:
                job = self.jobs_of.get(id(event.sequence))
                if job is None:
                    continue
                if event.text:
                    job.emit("piece", event.text)
                if event.result is not None:
                    del self.jobs_of[id(event.sequence)]
                    self.counts["served"] += 1
                    job.emit("done", event.result)
            self.busy = bool(self.batch.running)

    def _take(self, block: bool) -> None:
        """Waiting jobs into free slots (blocking for the first when nothing runs); a score job runs at once."""
        while self.batch.free:
            try:
                job = self.jobs.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            if self.stopping:
                job.cancelled.set()
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
                job.emit("done", None)
            elif job.kind == "score":
                self._run(job)
            else:
                self._join(job)

    def _join(self, job: Job) -> None:
        try:
            sequence = self.batch.add(job.ids, job.options, key=time.perf_counter())
        except ArborError as e:
            self.counts["failed"] += 1
            job.emit("error", RequestError(400 if isinstance(e, (ContextError, UsageError)) else 500, str(e)))
            return
        self.counts["reused_tokens"] += sequence.session.reused
        self.jobs_of[id(sequence)] = job

    def _drop_cancelled(self) -> None:
        """Sequences whose clients went away leave the batch now: their slots take the next waiting requests."""
        for sequence in list(self.batch.running):
            job = self.jobs_of.get(id(sequence))
            if job is not None and (job.cancelled.is_set() or self.stopping):
                self.batch.cancel(sequence)
                del self.jobs_of[id(sequence)]
                self.counts["cancelled"] += 1
                job.emit("done", None)

    def _fail_all(self, e: Exception) -> None:
        error = (RequestError(400 if isinstance(e, (ContextError, UsageError)) else 500, str(e))
                 if isinstance(e, ArborError) else
                 RequestError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        for sequence in list(self.batch.running):
            job = self.jobs_of.pop(id(sequence), None)
            self.batch.cancel(sequence)
            if job is not None:
                self.counts["failed"] += 1
                job.emit("error", error)
        self.batch = self.model.batch(self.parallel, self.context)  # fresh slots: a failed step may have left any state
