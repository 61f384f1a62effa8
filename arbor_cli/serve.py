"""`arbor serve`: an OpenAI-compatible HTTP API in front of one Model (Starlette on uvicorn).

    /v1/chat/completions   chat, streamed (server-sent events) or not
    /v1/completions        text or token-id prompts; `echo` with `logprobs` scores the prompt itself
    /v1/models, /health    what is served; the queue and what it did
    /tokenize, /detokenize llama.cpp's server's shape: token counts for clients that cut documents

One worker thread runs the generations, one at a time in arrival order, from a bounded queue: a
request that finds it full is answered 503 at once with an OpenAI-style error body, never left
waiting without bound. A client that goes away mid-stream (or before its turn) stops its generation
between two tokens. The worker keeps the last request's KV cache: a chat that extends the previous
conversation prefills only its new tokens (the prompt's longest common prefix with what the cache
holds, in whole prefill chunks, so that what is prefilled after it is cut as a fresh run cuts it and
the answer is the fresh run's: on a CPU the int4 kernels round differently for 30 rows than for 512).
The context is planned per request as the CLI plans it
(prompt + max_tokens); a prompt that does not fit is a 400 error, never silently truncated.
No tensors here: only Model's door.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from arbor_core.errors import ArborError, ContextError, UsageError

from .generate import GenerationOptions

DEFAULT_QUEUE = 16  # requests waiting beside the one running; more are refused with 503
DEFAULT_MAX_TOKENS = 1024  # when a request gives none: OpenAI's own default is "the room left"
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, type, and the parameter at fault."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker(threading.Thread):
    """Runs jobs one at a time, keeping the last cache for the next request's common prefix."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE):
        super().__init__(name="arbor-serve-worker", daemon=True)
        self.model = model
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.cache = None
        self.cached_ids: list[int] = []
        self.busy = False
        self.counts = {"served": 0, "cancelled": 0, "refused": 0, "failed": 0, "reused_tokens": 0}

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counts["refused"] += 1
            raise RequestError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                               "retry later", "server_overloaded", code="queue_full") from None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                job.emit("done", None)
                continue
            self.busy = True
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
                self.busy = False

    def _cache_for(self, job: Job) -> int:
        """A cache for the job's context holding the longest prefix of its prompt it can; that length."""
        model = self.model
        if self.cache is None or self.cache.capacity != job.context:
            self.cache = None  # the old one goes before the new one is allocated
            self.cache, self.cached_ids = model.new_cache(job.context), []
        same = 0
        for a, b in zip(self.cached_ids, job.ids):
            if a != b:
                break
            same += 1
        same = min(same, len(job.ids) - 1)  # at least one token is prefilled for the logits
        # whole prefill chunks only: the rest is then prefilled in the chunks a fresh run would use, so the
        # answer is the one a fresh request gets (a CPU kernel's rounding depends on how many rows it runs)
        self.cache.truncate(same - same % self.model.prefill_chunk)
        same = self.cache.length  # a ring may keep less
        self.cached_ids = self.cached_ids[:same]
        return same

    def _generate(self, job: Job) -> None:
        start = self._cache_for(job)
        self.counts["reused_tokens"] += start
        stream = self.model.stream(job.ids[start:], job.options, cache=self.cache)
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    break
                job.emit("piece", piece)
        finally:
            self.cached_ids = (job.ids + stream.tokens)[:self.cache.length]
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.emit("done", None)
            return
        self.counts["served"] += 1
        job.emit("done", stream.result)

    def _score(self, job: Job) -> list[float | None]:
        """log p of each prompt token given the ones before it (None for the first: nothing precedes it)."""
        if self.cache is None or self.cache.capacity != job.context:
            self.cache = None
            self.cache = self.model.new_cache(job.context)
        self.cache.truncate(0)
        self.cached_ids = []
        scored = self.model.prefill_log_probs(job.ids, self.cache)
        self.cached_ids = job.ids[:self.cache.length]
        self.counts["served"] += 1
        return [None, *scored]


class Server:
    """The API over one Model: request parsing, the worker, and responses (no HTTP framework here)."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE, api_key: str | None = None, name: str | None = None):
        self.model, self.api_key = model, api_key
        self.name = name or served_name(model.checkpoint.name)
        self.worker = Worker(model, queue_size)
        self.created = int(time.time())
        # the user's --context, else the largest context the machine's free memory holds now
        self.max_context = model.context or model.memory_report()["max_context"] or model.config.trained_context

    def start(self) -> None:
        self.worker.start()

    # ---- requests --------------------------------------------------------------------------
    def check_key(self, authorization: str | None) -> None:
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            raise RequestError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        asked = body.get("model")
        if asked is not None and not isinstance(asked, str):
            raise RequestError(400, "'model' must be a string", param="model")
        if asked and asked not in (self.name, self.model.checkpoint.name):
            raise RequestError(404, f"the model '{asked}' does not exist; this server serves '{self.name}'",
                               param="model", code="model_not_found")

    def chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, "each message needs a role of system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text ones only
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise RequestError(400, "each message needs a text content", param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            return self.model.tokenizer.encode_chat(clean, add_generation_prompt=True)
        except ArborError as e:
            raise RequestError(400, str(e), param="messages") from None

    def completion_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            return self.model.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
            return prompt
        raise RequestError(400, "'prompt' is required: a non-empty string or list of token ids (one prompt)",
                           param="prompt")

    def options(self, body: dict, prompt_tokens: int) -> tuple[GenerationOptions, int]:
        """The sampling options and the context planned for prompt + answer (400 when they cannot fit)."""
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported", param="n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise RequestError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        room = self.max_context - prompt_tokens
        if room < 1:
            raise RequestError(400, f"the prompt has {prompt_tokens} tokens; this server's context holds "
                               f"{self.max_context}: shorten it", param="messages", code="context_length_exceeded")
        wanted = min(max_tokens or DEFAULT_MAX_TOKENS, room) if max_tokens is None else max_tokens
        if prompt_tokens + wanted > self.max_context:
            raise RequestError(400, f"the prompt ({prompt_tokens} tokens) and max_tokens ({wanted}) exceed this "
                               f"server's {self.max_context}-token context; ask for fewer", param="max_tokens",
                               code="context_length_exceeded")
        stop = body.get("stop")
        try:
            options = GenerationOptions.build(
                max_new_tokens=wanted, temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                top_k=int(_number(body, "top_k", 0)), seed=body.get("seed"), stop=stop,
                repetition_penalty=_number(body, "repetition_penalty", 1.0), ignore_eos=bool(body.get("ignore_eos")))
        except ArborError as e:
            raise RequestError(400, str(e)) from None
        try:
            context = self.model.plan(prompt_tokens + wanted).context
        except ArborError as e:
            raise RequestError(400, str(e), code="context_length_exceeded") from None
        if prompt_tokens + wanted > context:
            raise RequestError(400, f"the prompt and max_tokens ({prompt_tokens + wanted} tokens) do not fit the "
                               f"{context}-token context this machine can hold", code="context_length_exceeded")
        return options, context

    # ---- responses -------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "arbor", "max_model_len": self.max_context}]}

    def health(self) -> dict:
        w = self.worker
        return {"status": "ok", "model": self.name, "busy": w.busy, "waiting": w.jobs.qsize(),
                "queue_size": w.jobs.maxsize, "max_context": self.max_context, **w.counts}


def served_name(checkpoint_name: str) -> str:
    """The model id clients use: a registry name as it is, a path's last part (without .gguf)."""
    from pathlib import PurePath

    if "/" not in checkpoint_name and "\\" not in checkpoint_name:
        return checkpoint_name
    name = PurePath(checkpoint_name).name
    return name[:-5] if name.endswith(".gguf") else name


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number", param=name)
    return float(value)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(server: Server):
    """The Starlette application over `server`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def parse(request: Request) -> dict:
        server.check_key(request.headers.get("authorization"))
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        server.check_model(body)
        return body

    async def wait_for(job: Job, request: Request):
        """The job's events until done; the job is cancelled when the client goes away first."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return
                    continue
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancelled.set()  # a no-op when done; stops a generation whose client went away

    async def generate(request: Request, chat: bool):
        try:
            body = await parse(request)
            ids = server.chat_ids(body) if chat else server.completion_ids(body)
            if not chat and body.get("echo") and body.get("logprobs") is not None:
                return await score(request, body, ids)
            options, context = server.options(body, len(ids))
            job = Job(ids, options, context, asyncio.get_running_loop())
            server.worker.submit(job)
        except RequestError as e:
            return error_response(e)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_events(job, request, rid, created, chat, len(ids), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, result = [], None
        try:
            async for kind, value in wait_for(job, request):
                if kind == "piece":
                    text.append(value)
                elif kind == "done":
                    result = value
        except RequestError as e:
            return error_response(e)
        if result is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        finish, used = FINISH.get(result.finish_reason, "stop"), usage(len(ids), len(result.tokens))
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish}
                  if chat else {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": server.name, "choices": [choice], "usage": used})

    async def stream_events(job: Job, request: Request, rid: str, created: int, chat: bool, prompt_tokens: int,
                            include_usage: bool):
        def chunk(delta_or_text, finish=None, **extra):
            choice = ({"index": 0, "delta": delta_or_text, "finish_reason": finish} if chat
                      else {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish})
            return sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": server.name, "choices": [choice], **extra})

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        try:
            async for kind, value in wait_for(job, request):
                if kind == "piece":
                    yield chunk({"content": value} if chat else value)
                elif kind == "done" and value is not None:
                    yield chunk({} if chat else "", FINISH.get(value.finish_reason, "stop"))
                    if include_usage:
                        yield sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created, "model": server.name, "choices": [],
                                   "usage": usage(prompt_tokens, len(value.tokens))})
        except RequestError as e:  # headers are sent: the error travels as an event, as OpenAI's API does
            yield sse(e.body())
        yield sse("[DONE]")

    async def score(request: Request, body: dict, ids: list[int]):
        """completions with echo + logprobs: the prompt's tokens and their log-probabilities."""
        if body.get("stream"):
            raise RequestError(400, "echo with logprobs is not streamed", param="stream")
        if len(ids) > server.max_context:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server's context holds "
                               f"{server.max_context}", param="prompt", code="context_length_exceeded")
        context = server.model.plan(len(ids)).context
        job = Job(ids, GenerationOptions(), context, asyncio.get_running_loop(), kind="score")
        server.worker.submit(job)
        scored = None
        async for kind, value in wait_for(job, request):
            if kind == "scored":
                scored = value
        tokenizer = server.model.tokenizer
        pieces = [tokenizer.decode([t]) for t in ids]
        offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        logprobs = {"tokens": pieces, "token_logprobs": scored, "top_logprobs": None, "text_offset": offsets}
        return JSONResponse({"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                             "model": server.name, "usage": usage(len(ids), 0),
                             "choices": [{"index": 0, "text": "".join(pieces), "logprobs": logprobs,
                                          "finish_reason": "length"}]})

    async def chat_completions(request: Request):
        return await guarded(generate(request, chat=True))

    async def completions(request: Request):
        return await guarded(generate(request, chat=False))

    async def guarded(coroutine):
        try:
            return await coroutine
        except RequestError as e:
            return error_response(e)

    async def models(request: Request):
        try:
            server.check_key(request.headers.get("authorization"))
        except RequestError as e:
            return error_response(e)
        return JSONResponse(server.models())

    async def health(request: Request):
        return JSONResponse(server.health())

    async def tokenize(request: Request):
        try:
            body = await parse(request)
            content = body.get("content")
            if not isinstance(content, str):
                raise RequestError(400, "'content' must be a string", param="content")
        except RequestError as e:
            return error_response(e)
        return JSONResponse({"tokens": server.model.tokenizer.encode(content, add_special_tokens=False)})

    async def detokenize(request: Request):
        try:
            body = await parse(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise RequestError(400, "'tokens' must be a list of token ids", param="tokens")
        except RequestError as e:
            return error_response(e)
        return JSONResponse({"content": server.model.tokenizer.decode(tokens)})

    async def not_found(request: Request, exc):
        return error_response(RequestError(404, f"no route {request.url.path}", code="not_found"))

    async def bad_method(request: Request, exc):
        return error_response(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        yield

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method}, lifespan=lifespan)
