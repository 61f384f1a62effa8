"""Where generations run: any OpenAI-compatible server (`--engine URL`: vLLM, llama.cpp's server,
Ollama, another `arbor serve`) instead of a model loaded here.

`RemoteModel` is the door (arbor_core.door.Door) over a server: a tokenizer (the local one of the
named model: token counts must be right for parts to fit), `plan` against the server's context (its
/v1/models `max_model_len`, else the model's trained context), `chat` and `stream` (chat completions
for messages, completions for token ids), `score_prompt` (completions with echo + logprobs, which
arbor serve and vLLM answer) for ask's ranking. A Session here holds only token ids: the server keeps
its own cache. `map` runs `parallel` requests at once (the summariser's map phase, ask's reading of
parts). The server's errors become one-line EngineErrors; refused connections, timeouts, 429 and 5xx
are retried with backoff (Retry-After honoured). Greedy chat answers are kept in an AnswerLog
(answer_log.py), so a run the engine broke off resumes where it stopped; only an answer that passed
validation is kept (a malformed one is an EngineError, and asked again next time).

Waiting is bounded (`--engine-timeout T`, default TIMEOUT_S): connecting, the answer's head, a whole
non-streamed body and each streamed line must each come within T seconds; the tries of one request until its
answer starts take at most TOTAL_TRIES_OF_TIMEOUT x T in all. A server that hangs or trickles (a byte
every few seconds keeps a socket's own timeout happy) is caught by these clocks. While a request waits, a
notice every PROGRESS_S says so on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from arbor_core.errors import ArborError, ContextError, ScoringUnavailableError, UsageError
from arbor_core.number_input import check_number
from arbor_core.planner import ContextPlan, bucket_within

from .answer_log import AnswerLog
from .constrained import response_format
from .generate import GenerationOptions, GenerationResult, GenerationStream
from .mapping import BatchEvent, map_in_order, stream_each
from .session import Session

RETRIES = 3  # attempts after the first, for transient failures
BACKOFF_S = 0.5  # doubled each retry
TIMEOUT_S = 120.0  # connect, the answer's head, a whole body, each streamed event (--engine-timeout)
TOTAL_TRIES_OF_TIMEOUT = 2  # one request, all tries together, at most this many timeouts long
PROGRESS_S = 10.0  # a notice this often while a request waits
READ_BYTES = 1 << 16
TRANSIENT_STATUS = (408, 409, 429, 500, 502, 503, 504)


class EngineError(ArborError):
    """The engine could not be reached or refused the request (one line; exit 1)."""

    exit_code = 1


class RemoteModel:
    """The door over an OpenAI-compatible server."""

    def __init__(self, url: str, checkpoint, tokenizer, *, served: str | None = None, api_key: str | None = None,
                 parallel: int = 1, context: int | None = None, timeout: float = TIMEOUT_S,
                 answer_log: Path | None = None, opener: Callable | None = None,
                 notify: Callable[[str], None] | None = None):
        if parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        check_number(timeout, "--engine-timeout", above=0)
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.checkpoint, self.config, self.tokenizer = checkpoint, checkpoint.config, tokenizer
        self.api_key, self.parallel, self.timeout = api_key, parallel, timeout
        self.context = context  # the user's --context: every generation is planned at it
        self.rope_method = "auto"
        self.backend, self.device, self.dtype = "engine", self.url, "remote"
        self.notify: Callable[[str], None] = notify or (lambda message: None)
        self._open = opener or urllib.request.urlopen
        self._said_waiting = 0.0  # when the last "waiting" notice was given (one for all parallel requests)
        self.served, self.max_context = self._describe(served)
        self._log = AnswerLog(answer_log) if answer_log is not None else None

    # ---- what the server serves --------------------------------------------------------------
    def _describe(self, served: str | None) -> tuple[str, int]:
        """The model id to ask for and the context the server holds (/v1/models)."""
        listing = self.request("GET", "/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        ids = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if isinstance(data, list) else []
        if not ids:
            raise EngineError(f"the engine at {self.url} lists no models (/v1/models)")
        chosen = next((m for m in ids if m["id"] == served), None) if served else ids[0]
        if chosen is None:
            raise EngineError(f"the engine at {self.url} does not serve '{served}'; it serves "
                              f"{', '.join(m['id'] for m in ids)}")
        limit = chosen.get("max_model_len") or chosen.get("context_length") or self.config.trained_context
        return chosen["id"], int(limit)

    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None) -> ContextPlan:
        """The context for `needed_tokens`: the requested one (the user's --context), else the smallest
        bucket that holds them, within the server's context (planner.bucket_within)."""
        requested = self.context if requested is None else requested
        if requested is not None and requested > self.max_context:
            raise ContextError(f"--context {requested} is more than the engine's {self.max_context} tokens")
        return bucket_within(needed_tokens, self.max_context, self.config.trained_context, requested)

    def smaller_context(self, error: Exception, context: int, *, needed: int = 0, pinned: bool = False) -> int:
        raise error  # the server's memory is its own business

    def rope_scaling_for(self, context: int, rope: str | None = None) -> dict | None:
        return None  # the server decides

    def session_context(self) -> int:
        return self.plan(self.context or self.config.trained_context).context

    def kv_bytes_per_token(self) -> None:
        return None  # no KV cache here: the server keeps its own

    def session(self, context: int | None = None, rope: str | None = None) -> Session:
        """A Session that holds token ids only (the server keeps its own cache)."""
        return Session(self, context or self.session_context(), rope)

    def map(self, work: Callable[[Any], Any], items: Iterable[Any], on_done: Callable[[], None] | None = None
            ) -> Iterator[Any]:
        """work(item) for every item, results in order, `parallel` requests at once."""
        return map_in_order(work, items, on_done, self.parallel)

    # ---- generations -------------------------------------------------------------------------
    def stream_many(self, prompts: list, options: GenerationOptions | list[GenerationOptions], *,
                    context: int | None = None, rope: str | None = None, parallel: int | None = None
                    ) -> Iterator[BatchEvent]:
        """Each prompt as its own request, `--parallel` at once (the server batches them if it can)."""
        return stream_each(self, prompts, options, context=context, rope=rope)

    def chat(self, messages: list[dict], stream: bool = False, *, context: int | None = None, rope: str | None = None,
             session: Session | None = None, continuing: bool = False, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=None,
             repetition_penalty: float = 1.0, schema=None, **_) -> GenerationResult:
        """One chat completion (greedy answers come from the answer log when this request was answered
        before); `session` then holds the conversation's ids."""
        body = {"model": self.served, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if repetition_penalty != 1.0:
            body["repetition_penalty"] = repetition_penalty  # vLLM's and arbor serve's name for it
        if schema is not None:
            body["response_format"] = response_format(GenerationOptions.build(schema=schema).schema)
        kept = self._log.get(body) if self._log is not None and temperature == 0 else None
        if kept is not None:
            self._hold(session, messages, kept["text"])
            return GenerationResult(kept["text"], [], kept["finish_reason"], {"from_log": 1.0}, context or 0)
        t0 = time.perf_counter()
        reply = self.request("POST", "/chat/completions", body)
        text, finish, used = self._chat_answer(reply)
        result = GenerationResult(text, [], "length" if finish == "length" else "stop",
                                  {"prompt_tokens": used.get("prompt_tokens", 0),
                                   "generated_tokens": used.get("completion_tokens", 0),
                                   "decode_s": time.perf_counter() - t0}, context or 0)
        if self._log is not None and temperature == 0:
            self._log.put(body, {"text": text, "finish_reason": result.finish_reason})
        self._hold(session, messages, text)
        return result

    def _chat_answer(self, reply: Any) -> tuple[str, str, dict]:
        """(text, finish_reason, usage) of a chat completion, each checked to be what OpenAI's API says it is;
        an EngineError otherwise (and nothing of it is kept)."""
        try:
            choice = reply["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"the engine at {self.url} answered a chat completion without a message") from None
        text, finish = message.get("content") if isinstance(message, dict) else None, choice.get("finish_reason")
        if not isinstance(message, dict) or not isinstance(text, (str, type(None))):
            raise EngineError(f"the engine at {self.url} answered a chat completion whose message content is "
                              f"not text ({json.dumps(text if isinstance(message, dict) else message)[:60]})")
        if not isinstance(finish, (str, type(None))):
            raise EngineError(f"the engine at {self.url} answered a finish_reason that is not text "
                              f"({json.dumps(finish)[:60]})")
        used = reply.get("usage")
        used = {k: v for k, v in used.items() if isinstance(v, int) and not isinstance(v, bool)} \
            if isinstance(used, dict) else {}
        return text or "", finish or "stop", used

    def stream(self, prompt: list[int] | list[dict], options: GenerationOptions, *, session: Session | None = None,
               continuing: bool = False, context: int | None = None, rope: str | None = None) -> GenerationStream:
        """A streamed chat completion of messages, or completion of token ids (the server's own cache reuses
        what it can); `session` then holds the conversation's ids."""
        chat = bool(prompt) and isinstance(prompt[0], dict)
        body = {"model": self.served, "messages" if chat else "prompt": prompt, "stream": True,
                "max_tokens": options.max_new_tokens, "temperature": options.sampling.temperature,
                "top_p": options.sampling.top_p}
        if options.seed is not None:
            body["seed"] = options.seed
        if options.stop:
            body["stop"] = list(options.stop)
        if options.schema is not None:
            body["response_format"] = response_format(options.schema)  # the server holds the answer to it
        return GenerationStream(self._pieces("/chat/completions" if chat else "/completions", body, session), [])

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None, ignore_eos: bool = False,
                 stream: bool = False, add_special_tokens: bool = True, repetition_penalty: float = 1.0, *,
                 context: int | None = None, rope: str | None = None, schema=None
                 ) -> GenerationResult | GenerationStream:
        """Complete `prompt` (text, encoded here; or token ids) with a completion request."""
        opts = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                       repetition_penalty, schema)
        ids = list(prompt) if isinstance(prompt, list) else \
            self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        pieces = self.stream(ids, opts)
        if not stream:
            for _ in pieces:
                pass
            return pieces.result
        return pieces

    def _pieces(self, path: str, body: dict, session: Session | None):
        text, finish = [], "stop"
        try:
            for event in self.events(path, body):
                choices = event.get("choices") or ()
                if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                    raise EngineError(f"the engine at {self.url} streamed an event whose choices are not a list "
                                      "of objects")
                for choice in choices:
                    delta = choice.get("delta") or {}
                    piece = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text")
                    if piece is not None and not isinstance(piece, str):
                        raise EngineError(f"the engine at {self.url} streamed a piece that is not text "
                                          f"({json.dumps(piece)[:60]})")
                    if piece:
                        text.append(piece)
                        yield piece
                    reason = choice.get("finish_reason")
                    finish = reason if isinstance(reason, str) else finish
        finally:
            self._hold(session, body.get("messages") or body["prompt"], "".join(text))
        return GenerationResult("".join(text), [], "length" if finish == "length" else "stop", {}, 0)

    def _hold(self, session: Session | None, prompt: list[int] | list[dict], reply: str) -> None:
        """`session` holds the prompt and the reply, as the local tokenizer counts them."""
        if session is None:
            return
        if prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.encode_chat([*prompt, {"role": "assistant", "content": reply}],
                                             add_generation_prompt=True)
        else:
            ids = list(prompt) + self.tokenizer.encode(reply, add_special_tokens=False)
        session.hold(ids, start=0)

    def prefill(self, ids: list[int], session: Session) -> None:
        """The session holds `ids` too: the server reads them with the next request that needs them."""
        session.hold(session.ids + list(ids), start=0)

    def score_prompt(self, ids: list[int], session: Session | None = None) -> list[float]:
        """log p of ids[1:], each given the ones before it (and what `session` holds, sent before them):
        completions with echo and logprobs."""
        held = session.ids if session is not None else []
        prompt = held + list(ids)
        reply = self.request("POST", "/completions", {"model": self.served, "prompt": prompt, "echo": True,
                                                      "logprobs": 0, "max_tokens": 1, "temperature": 0})
        try:
            values = reply["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            values = None
        if not isinstance(values, list) or len(values) < len(prompt):
            raise ScoringUnavailableError(f"the engine at {self.url} does not score prompts (completions with echo and "
                              "logprobs)")
        if session is not None:
            session.hold(prompt, start=0)
        return [float(v) for v in values[len(held) + 1:len(prompt)]]

    # ---- HTTP --------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON request, retried when the failure is transient; EngineError when it fails for good."""
        clock = _Clock(self.timeout)
        with self._waiting(path, clock), self._attempts(method, path, body, clock) as response:
            raw = b"".join(self._chunks(response, path, clock))
            try:
                return json.loads(raw or b"null")
            except ValueError:
                raise EngineError(f"the engine at {self.url} answered {path} with something that is not JSON") from None

    def _chunks(self, response, path: str, clock: "_Clock") -> Iterator[bytes]:
        """The body as it comes, within the timeout from the clock's last restart (the head; for a stream,
        the last whole line)."""
        clock.restart()
        while True:
            try:
                chunk = response.read1(READ_BYTES)
            except (socket.timeout, TimeoutError):
                raise EngineError(self._too_slow(path)) from None
            if not chunk:
                return
            if clock.since_restart() > self.timeout:
                raise EngineError(self._too_slow(path))
            yield chunk

    def _lines(self, response, path: str, clock: "_Clock") -> Iterator[bytes]:
        """The body's lines, each within the timeout (a server that trickles bytes without ending a line
        is caught: the clock runs from the last whole line)."""
        pending = b""
        clock.restart()
        for chunk in self._chunks(response, path, clock):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                clock.restart()
            yield from lines
        if pending:
            yield pending

    def _too_slow(self, path: str) -> str:
        return (f"the engine at {self.url} stopped answering {path}: its answer did not come whole within "
                f"{self.timeout:g} s (--engine-timeout)")

    @contextlib.contextmanager
    def _waiting(self, path: str, clock: "_Clock"):
        """While the block runs, a notice whenever the engine has been silent for PROGRESS_S (the clock's
        last restart: a flowing stream says nothing), at most one every PROGRESS_S for all parallel requests."""
        done = threading.Event()

        def tell():
            while not done.wait(PROGRESS_S / 5):
                now = time.monotonic()
                if clock.since_restart() >= PROGRESS_S and now - self._said_waiting >= PROGRESS_S:
                    self._said_waiting = now
                    self.notify(f"waiting for the engine at {self.url} ({path}): {clock.elapsed():.0f} s so far; "
                                f"gives up after {self.timeout:g} s without an answer, {clock.total:g} s in all")

        teller = threading.Thread(target=tell, daemon=True)
        teller.start()
        try:
            yield
        finally:
            done.set()

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """The server-sent events of a streamed request, as JSON objects, until [DONE]."""
        clock = _Clock(self.timeout)
        with self._waiting(path, clock), self._attempts("POST", path, body, clock) as response:
            for raw in self._lines(response, path, clock):
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event, dict) and "error" in event:
                    raise EngineError(f"the engine at {self.url} failed mid-stream: {_message(event)}")
                if isinstance(event, dict):
                    yield event

    def _attempts(self, method: str, path: str, body: dict | None, clock: "_Clock | None" = None):
        clock = clock or _Clock(self.timeout)
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            clock.restart()
            try:
                return self._head_within(request, clock)
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in TRANSIENT_STATUS or attempt == RETRIES or clock.total_left() <= 0:
                    raise EngineError(f"the engine at {self.url} answered {e.code} to {path}: {detail}") from None
                wait = _retry_after(e) or delay
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    reason = f"no answer within {self.timeout:g} s"
                if attempt == RETRIES or clock.total_left() <= 0:
                    tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                    raise EngineError(f"cannot reach the engine at {self.url} ({reason}) after {tries} in "
                                      f"{clock.elapsed():.0f} s (--engine-timeout {self.timeout:g})") from None
                wait = delay
            wait = min(wait, max(0.0, clock.total_left()))
            self.notify(f"the engine at {self.url} failed ({path}); retrying in {wait:g} s")
            time.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable")


    def _head_within(self, request, clock: "_Clock"):
        """The answer's head (status and headers), within what the try may still wait. The socket's own
        timeout restarts with every byte, so a server trickling its head a byte at a time would never be cut
        off: the opening runs in a thread that is left behind (and its connection closed when it returns)
        if the head is not whole by then."""
        done: queue.Queue = queue.Queue(maxsize=1)
        left, gave_up = max(0.1, clock.left()), threading.Event()

        def open_it() -> None:
            try:
                response = self._open(request, timeout=left)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                done.put((False, e))
                return
            if gave_up.is_set():
                response.close()
            done.put((True, response))

        threading.Thread(target=open_it, daemon=True, name="arbor-engine-head").start()
        try:
            ok, value = done.get(timeout=left + 0.5)
        except queue.Empty:
            gave_up.set()
            raise TimeoutError(f"the answer's head did not come whole within {left:g} s") from None
        if not ok:
            raise value
        return value


class _Clock:
    """One request's clocks: the timeout runs from the last restart (a try, the head, a streamed line); the
    total bound, over the tries until an answer starts, from the start."""

    def __init__(self, timeout: float):
        self.timeout, self.total = timeout, TOTAL_TRIES_OF_TIMEOUT * timeout
        self.start = self.mark = time.monotonic()

    def restart(self) -> None:
        self.mark = time.monotonic()

    def since_restart(self) -> float:
        return time.monotonic() - self.mark

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def total_left(self) -> float:
        return self.total - self.elapsed()

    def left(self) -> float:
        """What the current try may still wait: its timeout, within the total bound."""
        return min(self.total_left(), self.timeout - self.since_restart())


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return _message(json.loads(e.read() or b"null"))
    except (ValueError, OSError):
        return e.reason if isinstance(e.reason, str) else "error"


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else (error if isinstance(error, str) else None)
    return (str(message) if message else json.dumps(body)[:200]).splitlines()[0][:300]


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return min(float(e.headers.get("Retry-After", "")), 30.0)
    except (TypeError, ValueError):
        return None


def connect(url: str, model: str | None = None, *, served: str | None = None, api_key: str | None = None,
            parallel: int = 1, context: int | None = None, quiet: bool = True, timeout: float = TIMEOUT_S,
            notify: Callable[[str], None] | None = None) -> RemoteModel:
    """A RemoteModel for the engine at `url`, counting tokens with the local tokenizer of `model`
    (default: arbor's default model)."""
    import arbor_weights
    from arbor_core.tokenizer import load_tokenizer

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--engine must be an http:// or https:// URL, got {url!r}")
    checkpoint = arbor_weights.resolve(model or arbor_weights.default_model(), quiet=quiet)
    log = arbor_weights.cache_dir() / "engine" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}.jsonl"
    return RemoteModel(url, checkpoint, load_tokenizer(checkpoint.path), served=served, api_key=api_key,
                       parallel=parallel, context=context, answer_log=log, timeout=timeout, notify=notify)
