"""`arbor serve`'s HTTP side: the Starlette routes over a Server. Each route is a function of (server,
request), bound to its server by functools.partial; what a body means and what an answer looks like is
`openai`'s, the generating is the worker's. A RequestError anywhere becomes its OpenAI-style error response.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..generate import GenerationOptions
from . import Server, openai
from .openai import RequestError, Reply
from .worker import Job

DISCONNECT_POLL_S = 0.5  # how often a waiting request looks whether its client is still there
BODY_TIMEOUT_S = 30.0  # a request's body must arrive whole within this (its head is bounded by serve/listen.py)


def create_app(server: Server) -> Starlette:
    """The Starlette application over `server`; its worker starts with the application."""
    routes = [Route("/v1/chat/completions", partial(chat_completions, server), methods=["POST"]),
              Route("/v1/completions", partial(completions, server), methods=["POST"]),
              Route("/v1/models", partial(models, server), methods=["GET"]),
              Route("/health", partial(health, server), methods=["GET"]),
              Route("/tokenize", partial(tokenize, server), methods=["POST"]),
              Route("/detokenize", partial(detokenize, server), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method},
                     lifespan=partial(running, server))


@contextlib.asynccontextmanager
async def running(server: Server, app: Starlette):
    server.start()
    yield


# ---- routes ------------------------------------------------------------------------------------
async def chat_completions(server: Server, request: Request):
    return await guarded(generate(server, request, chat=True))


async def completions(server: Server, request: Request):
    return await guarded(generate(server, request, chat=False))


async def models(server: Server, request: Request):
    try:
        server.check_key(request.headers.get("authorization"))
    except RequestError as e:
        return error_response(e)
    return JSONResponse(server.models())


async def health(server: Server, request: Request):
    """The queue and what it did; with --api-key, a caller without the key hears only that the server is up."""
    try:
        server.check_key(request.headers.get("authorization"))
    except RequestError:
        return JSONResponse({"status": "ok"})
    return JSONResponse(server.health())


async def tokenize(server: Server, request: Request):
    try:
        content = openai.tokenize_content(await parse(server, request))
    except RequestError as e:
        return error_response(e)
    return JSONResponse({"tokens": server.model.tokenizer.encode(content, add_special_tokens=False)})


async def detokenize(server: Server, request: Request):
    try:
        tokens = openai.detokenize_tokens(await parse(server, request), server.model.config.vocab_size)
    except RequestError as e:
        return error_response(e)
    return JSONResponse({"content": server.model.tokenizer.decode(tokens)})


async def not_found(request: Request, exc):
    return error_response(RequestError(404, f"no route {request.url.path}", code="not_found"))


async def bad_method(request: Request, exc):
    return error_response(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))


# ---- requests and errors -----------------------------------------------------------------------
def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def guarded(coroutine):
    try:
        return await coroutine
    except RequestError as e:
        return error_response(e)


async def parse(server: Server, request: Request) -> dict:
    """The request's body, once its key and the model it names pass."""
    server.check_key(request.headers.get("authorization"))
    try:  # a client that trickles its body is not waited on without bound
        raw = await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout") from None
    body = openai.parse_body(raw)
    server.check_model(body)
    return body


# ---- generation --------------------------------------------------------------------------------
async def generate(server: Server, request: Request, chat: bool):
    """A chat or text completion: queued for the worker, answered whole or streamed."""
    try:
        body = await parse(server, request)
        openai.check_parameters(body)
        ids = server.chat_ids(body) if chat else server.completion_ids(body)
        if not chat and body.get("echo") and body.get("logprobs") is not None:
            return await score(server, request, body, ids)
        options, context = server.options(body, len(ids))
        job = Job(ids, options, context, asyncio.get_running_loop())
        server.worker.submit(job)
    except RequestError as e:
        return error_response(e)
    reply = Reply.start(server.name, chat)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))  # checked to be an object
        return StreamingResponse(stream_events(job, request, reply, len(ids), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await whole_answer(job, request, reply, len(ids))


async def whole_answer(job: Job, request: Request, reply: Reply, prompt_tokens: int):
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
    return JSONResponse(reply.whole("".join(text), result, prompt_tokens))


async def stream_events(job: Job, request: Request, reply: Reply, prompt_tokens: int, include_usage: bool):
    """The answer as server-sent events, ending with [DONE]."""
    for opening in reply.opening():
        yield opening
    try:
        async for kind, value in wait_for(job, request):
            if kind == "piece":
                yield reply.piece(value)
            elif kind == "done" and value is not None:
                yield reply.finish(value)
                if include_usage:
                    yield reply.usage_chunk(prompt_tokens, value)
    except RequestError as e:  # headers are sent: the error travels as an event, as OpenAI's API does
        yield openai.sse(e.body())
    yield openai.sse("[DONE]")


async def score(server: Server, request: Request, body: dict, ids: list[int]):
    """completions with echo + logprobs: the prompt's tokens and their log-probabilities."""
    openai.check_scoring(body, len(ids), server.max_context)
    context = server.plan_context(len(ids))
    job = Job(ids, GenerationOptions(), context, asyncio.get_running_loop(), kind="score")
    server.worker.submit(job)
    scored = None
    async for kind, value in wait_for(job, request):
        if kind == "scored":
            scored = value
    return JSONResponse(openai.scored_completion(server.name, ids, scored, server.model.tokenizer))


async def wait_for(job: Job, request: Request):
    """The job's events until done; the job is cancelled when the client goes away first. The client is looked
    at every DISCONNECT_POLL_S whether events flow or not: a non-streaming client that leaves while its answer
    is being generated (events flowing to nobody) stops it as a streaming one does."""
    loop = asyncio.get_running_loop()
    looked = loop.time()
    try:
        while True:
            if loop.time() - looked >= DISCONNECT_POLL_S:
                looked = loop.time()
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return
    finally:
        job.cancelled.set()  # a no-op when done; stops a generation whose client went away
