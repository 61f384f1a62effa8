"""Where generations run: any OpenAI-compatible server (`--engine URL`: vLLM, llama.cpp's server,
Ollama, another `arbor serve`) instead of a model loaded here.

`RemoteModel` offers the part of `Model`'s door that summarize, ask and chat use: a tokenizer (the
local one of the named model: token counts must be right for parts to fit), `plan` against the
server's context (its /v1/models `max_model_len`, else the model's trained context), `chat`, a
streamed `chat_stream`, and `prompt_log_probs` (completions with echo + logprobs, which arbor serve
and vLLM answer) for ask's ranking. `parallel` requests may run at once: the summariser's map phase
and ask's reading of parts go through `run_all`. The server's errors become one-line EngineErrors; refused
connections, timeouts, 429 and 5xx are retried with backoff (Retry-After honoured). Greedy answers
are kept in an append-only log under the cache (`engine/`), so a run the engine broke off resumes
where it stopped: what was answered is not asked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from arbor_core.errors import ArborError, ContextError, UsageError
from arbor_core.planner import BUCKETS

from .generate import GenerationResult, GenerationStream

RETRIES = 3  # attempts after the first, for transient failures
BACKOFF_S = 0.5  # doubled each retry
TIMEOUT_S = 600.0
TRANSIENT_STATUS = (408, 409, 429, 500, 502, 503, 504)
ANSWER_LOG_MAX_BYTES = 64 << 20  # the kept answers of one served model; beyond it, the older half goes


class EngineError(ArborError):
    """The engine could not be reached or refused the request (one line; exit 1)."""

    exit_code = 1


class Plan:
    def __init__(self, context: int, needed_tokens: int, trained_context: int):
        self.context, self.needed_tokens, self.trained_context = context, needed_tokens, trained_context
        self.scaled = False  # the server decides its RoPE


class RemoteModel:
    """The Model surface of summarize, ask and chat, over an OpenAI-compatible server."""

    remote = True

    def __init__(self, url: str, checkpoint, tokenizer, *, served: str | None = None, api_key: str | None = None,
                 parallel: int = 1, context: int | None = None, timeout: float = TIMEOUT_S,
                 answer_log: Path | None = None, opener: Callable | None = None):
        if parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.checkpoint, self.config, self.tokenizer = checkpoint, checkpoint.config, tokenizer
        self.api_key, self.parallel, self.timeout = api_key, parallel, timeout
        self.context = context  # the user's --context: every generation is planned at it
        self.rope_method = "auto"
        self.backend, self.device, self.dtype = "engine", self.url, "remote"
        self.notify: Callable[[str], None] = lambda message: None
        self._open = opener or urllib.request.urlopen
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

    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None) -> Plan:
        """The context for `needed_tokens`: the requested one (the user's --context), else the smallest
        bucket that holds them, within the server's context."""
        requested = self.context if requested is None else requested
        if requested is not None:
            if requested > self.max_context:
                raise ContextError(f"--context {requested} is more than the engine's {self.max_context} tokens")
            return Plan(requested, needed_tokens, self.config.trained_context)
        fitting = [b for b in BUCKETS if b <= self.max_context] or [self.max_context]
        holding = [b for b in fitting if b >= needed_tokens]
        return Plan(holding[0] if holding else fitting[-1], needed_tokens, self.config.trained_context)

    def smaller_context(self, error: Exception, context: int, *, needed: int = 0, pinned: bool = False) -> int:
        raise error  # the server's memory is its own business

    def rope_scaling_for(self, context: int, rope: str | None = None) -> dict | None:
        return None  # the server decides

    # ---- generations -------------------------------------------------------------------------
    def chat(self, messages: list[dict], stream: bool = False, *, context: int | None = None, rope: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop=None, repetition_penalty: float = 1.0, **_) -> GenerationResult:
        """One chat completion (greedy answers come from the answer log when this request was answered before)."""
        body = {"model": self.served, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if repetition_penalty != 1.0:
            body["repetition_penalty"] = repetition_penalty  # vLLM's and arbor serve's name for it
        kept = self._log.get(body) if self._log is not None and temperature == 0 else None
        if kept is not None:
            return GenerationResult(kept["text"], [], kept["finish_reason"], {"from_log": 1.0}, context or 0)
        t0 = time.perf_counter()
        reply = self.request("POST", "/chat/completions", body)
        try:
            choice = reply["choices"][0]
            text, finish = choice["message"]["content"] or "", choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"the engine at {self.url} answered a chat completion without a message") from None
        used = reply.get("usage") or {}
        result = GenerationResult(text, [], "length" if finish == "length" else "stop",
                                  {"prompt_tokens": used.get("prompt_tokens", 0),
                                   "generated_tokens": used.get("completion_tokens", 0),
                                   "decode_s": time.perf_counter() - t0}, context or 0)
        if self._log is not None and temperature == 0:
            self._log.put(body, {"text": text, "finish_reason": result.finish_reason})
        return result

    def chat_stream(self, messages: list[dict], options) -> GenerationStream:
        """A streamed chat completion with GenerationOptions `options` (arbor chat over an engine)."""
        body = {"model": self.served, "messages": messages, "stream": True, "max_tokens": options.max_new_tokens,
                "temperature": options.sampling.temperature, "top_p": options.sampling.top_p}
        if options.seed is not None:
            body["seed"] = options.seed
        if options.stop:
            body["stop"] = list(options.stop)
        return GenerationStream(self._chat_pieces(body), [])

    def _chat_pieces(self, body: dict):
        text, finish = [], "stop"
        for event in self.events("/chat/completions", body):
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    yield piece
                finish = choice.get("finish_reason") or finish
        return GenerationResult("".join(text), [], "length" if finish == "length" else "stop", {}, 0)

    def prompt_log_probs(self, ids: list[int]) -> list[float]:
        """log p of ids[1:], each given the ones before it: completions with echo and logprobs."""
        reply = self.request("POST", "/completions", {"model": self.served, "prompt": ids, "echo": True,
                                                      "logprobs": 0, "max_tokens": 1, "temperature": 0})
        try:
            values = reply["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            values = None
        if not isinstance(values, list) or len(values) < len(ids):
            raise EngineError(f"the engine at {self.url} does not score prompts (completions with echo and "
                              "logprobs)")
        return [float(v) for v in values[1:len(ids)]]

    # ---- HTTP --------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON request, retried when the failure is transient; EngineError when it fails for good."""
        with self._attempts(method, path, body) as response:
            try:
                return json.loads(response.read() or b"null")
            except ValueError:
                raise EngineError(f"the engine at {self.url} answered {path} with something that is not JSON") from None

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """The server-sent events of a streamed request, as JSON objects, until [DONE]."""
        with self._attempts("POST", path, body) as response:
            for raw in response:
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

    def _attempts(self, method: str, path: str, body: dict | None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                return self._open(request, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in TRANSIENT_STATUS or attempt == RETRIES:
                    raise EngineError(f"the engine at {self.url} answered {e.code} to {path}: {detail}") from None
                wait = _retry_after(e) or delay
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if attempt == RETRIES:
                    raise EngineError(f"cannot reach the engine at {self.url} ({reason}) after {RETRIES + 1} "
                                      "tries") from None
                wait = delay
            self.notify(f"the engine at {self.url} failed ({path}); retrying in {wait:g} s")
            time.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable")


def run_all(model, work: Callable[[Any], Any], items: Iterable[Any], on_done: Callable[[], None] = lambda: None
            ) -> list[Any]:
    """work(item) for every item, results in order: `model.parallel` at a time on an engine, one after
    another on a model loaded here (one model runs one generation at a time)."""
    items, parallel = list(items), getattr(model, "parallel", 1)

    def one(item):
        result = work(item)
        on_done()
        return result

    if parallel == 1 or len(items) < 2:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, items))


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


class AnswerLog:
    """Greedy answers an engine gave, one JSON line each, keyed by the request: a rerun after a failure
    asks only what was not answered yet. Appends are one write of one line (safe across threads here)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._answers: dict[str, dict] | None = None

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _load(self) -> dict[str, dict]:
        if self._answers is None:
            self._answers = {}
            try:
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                            self._answers[row["key"]] = row["answer"]
                        except (ValueError, KeyError, TypeError):
                            continue  # a line cut by a crash: that answer is asked again
            except OSError:
                pass
        return self._answers

    def get(self, body: dict) -> dict | None:
        with self._lock:
            return self._load().get(self.key(body))

    def put(self, body: dict, answer: dict) -> None:
        with self._lock:
            self._load()[self.key(body)] = answer
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._trim()
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": self.key(body), "answer": answer}, ensure_ascii=False) + "\n")
            except OSError:
                pass  # keeping answers is an optimisation

    def _trim(self) -> None:
        try:
            if self.path.stat().st_size <= ANSWER_LOG_MAX_BYTES:
                return
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            temp = self.path.with_name(f".{self.path.name}.tmp")
            temp.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
            os.replace(temp, self.path)
        except OSError:
            pass


def connect(url: str, model: str | None = None, *, served: str | None = None, api_key: str | None = None,
            parallel: int = 1, context: int | None = None, quiet: bool = True) -> RemoteModel:
    """A RemoteModel for the engine at `url`, counting tokens with the local tokenizer of `model`
    (default: arbor's default model)."""
    import arbor_weights
    from arbor_core.tokenizer import load_tokenizer

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--engine must be an http:// or https:// URL, got {url!r}")
    checkpoint = arbor_weights.resolve(model or arbor_weights.DEFAULT_MODEL, quiet=quiet)
    log = arbor_weights.cache_dir() / "engine" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}.jsonl"
    return RemoteModel(url, checkpoint, load_tokenizer(checkpoint.path), served=served, api_key=api_key,
                       parallel=parallel, context=context, answer_log=log)
