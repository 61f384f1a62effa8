"""`arbor serve`: an OpenAI-compatible HTTP API in front of one Model (Starlette on uvicorn).

    /v1/chat/completions   chat, streamed (server-sent events) or not
    /v1/completions        text or token-id prompts; `echo` with `logprobs` scores the prompt itself
    /v1/models, /health    what is served; the queue and what it did
    /tokenize, /detokenize llama.cpp's server's shape: token counts for clients that cut documents

One worker thread runs the generations from a bounded queue: one at a time in arrival order (--parallel
1), or up to N decoded together (--parallel N, continuous batching: a request joins the running batch at
the next step and leaves when done; worker.BatchWorker). A request that finds the queue full is answered 503 at once with an OpenAI-style error body, never left
waiting without bound. A client that goes away mid-stream (or before its turn) stops its generation
between two tokens. The worker keeps the last request's KV cache: a chat that extends the previous
conversation prefills only its new tokens (the prompt's longest common prefix with what the cache
holds, in whole prefill chunks, so that what is prefilled after it is cut as a fresh run cuts it and
the answer is the fresh run's: on a CPU the int4 kernels round differently for 30 rows than for 512).
The context is planned per request as the CLI plans it
(prompt + max_tokens); a prompt that does not fit is a 400 error, never silently truncated.
No tensors here: only Model's door.

Every parameter a request names is checked for its type before anything runs (a 400 naming it); a client
that leaves is noticed within half a second whether it streams or not; with --api-key, /health tells a
caller without the key only {"status": "ok"}.

Split as llama.cpp splits its server: `openai` (request bodies in, response bodies and events out; pure),
`worker` (the queue and the one thread that generates), `app` (the HTTP routes; imports Starlette, so it
is imported only once `arbor serve` knows Starlette is installed), `listen` (the socket, bound before the
model loads; bounds on slow and too many connections; one Ctrl-C stops it all), and here `Server`, which
binds the model and this server's limits to them.
"""

from __future__ import annotations

import time

from arbor_core.errors import ArborError
from arbor_core.planner import next_smaller

from ..constrained import prepare_tokenizer
from . import openai
from .openai import RequestError, served_name
from .worker import DEFAULT_QUEUE, BatchWorker, Job, Worker

LOOPBACK = ("127.0.0.1", "localhost", "::1")

__all__ = ["DEFAULT_QUEUE", "LOOPBACK", "Job", "RequestError", "Server", "Worker", "served_name"]


class Server:
    """The API over one Model: request parsing, the worker, and responses (no HTTP framework here)."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE, api_key: str | None = None, name: str | None = None,
                 parallel: int | None = 1):
        """`parallel`: requests decoded at once (1: one at a time; None: as many as free memory holds at the
        slots' context, planner.batch_that_fits)."""
        self.model, self.api_key = model, api_key
        self.name = name or served_name(model.checkpoint.name)
        self.created = int(time.time())
        if parallel == 1:
            self.worker = Worker(model, queue_size)
            # the user's --context, else the largest context the machine's free memory holds now
            self.max_context = model.context or model.memory_report()["max_context"] or model.config.trained_context
        else:
            self.max_context, parallel = slots_that_fit(model, parallel)
            self.worker = BatchWorker(model, queue_size, parallel=parallel, context=self.max_context)
        self.parallel = parallel

    def start(self) -> None:
        self.worker.start()

    # ---- requests --------------------------------------------------------------------------
    def check_key(self, authorization: str | None) -> None:
        openai.check_key(self.api_key, authorization)

    def check_model(self, body: dict) -> None:
        openai.check_model(body, self.name, self.model.checkpoint.name)

    def chat_ids(self, body: dict) -> list[int]:
        return openai.chat_ids(body, self.model.tokenizer)

    def completion_ids(self, body: dict) -> list[int]:
        return openai.completion_ids(body, self.model.tokenizer, self.model.config.vocab_size)

    def options(self, body: dict, prompt_tokens: int):
        """The sampling options and the context planned for prompt + answer (400 when they cannot fit, or
        when a response_format's schema cannot be held on this model's tokenizer)."""
        options, context = openai.generation_options(body, prompt_tokens, self.max_context, self.plan_context)
        if options.schema is not None:
            try:
                prepare_tokenizer(self.model.tokenizer)
            except ArborError as e:
                raise RequestError(400, str(e), param="response_format") from None
        return options, context

    def plan_context(self, tokens: int) -> int:
        """The context this machine runs for `tokens` tokens (the CLI's plan)."""
        return self.model.plan(tokens).context

    # ---- responses -------------------------------------------------------------------------
    def models(self) -> dict:
        return openai.model_list(self.name, self.created, self.max_context)

    def health(self) -> dict:
        w = self.worker
        return {"status": "ok", "model": self.name, "busy": w.busy, "waiting": w.jobs.qsize(),
                "queue_size": w.jobs.maxsize, "max_context": self.max_context, "parallel": self.parallel,
                "running": getattr(w, "running", int(w.busy)), **w.counts}


def slots_that_fit(model, parallel: int | None) -> tuple[int, int]:
    """(each slot's context, the number of slots) for --parallel `parallel` (None: as many as fit): the user's
    --context, else the session context (the trained context's bucket), one bucket smaller at a time while
    `parallel` slots of it do not fit free memory."""
    context = model.context or model.session_context()
    if parallel is None:
        return context, model.batch_size(context)
    while not model.context and model.batch_size(context, most=parallel) < parallel:
        smaller = next_smaller(context)
        if smaller is None:
            break
        context = smaller
    return context, parallel
