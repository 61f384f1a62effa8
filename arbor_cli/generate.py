"""Generation: validated sampling options, the prefill/decode loop, stop strings, streamed text.

The loop is the same on every backend: it asks the LoadedModel to prefill and decode, to sample
on its device, and turns token ids into text with the tokenizer's streaming decoder, holding back
text that might be the start of a stop string so a stop never leaks to the user.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator

from arbor_core.backend import REPEAT_WINDOW, LoadedModel, SamplingParams
from arbor_core.errors import UsageError

from .constrained import ANY_JSON_OBJECT, TokenConstraint, schema_text

MAX_NEW_TOKENS_LIMIT = 1 << 20


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    schema: str | None = None  # a JSON schema's canonical text: every step's tokens masked to it (constrained.py)

    @classmethod
    def build(cls, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
              ignore_eos=False, repetition_penalty=1.0, schema=None) -> "GenerationOptions":
        """Validate user-supplied values; every bad one is a UsageError naming the CLI option (and the
        API's parameter where its name differs). `schema`: a JSON schema (dict or JSON text) the answer
        must match, "json_object" for any JSON object; checked to compile here (constrained.SchemaError)."""
        if not isinstance(max_new_tokens, int) or not 0 < max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise UsageError(f"--max-tokens (max_new_tokens) must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
        if not _finite(temperature) or not 0 <= temperature <= 100:
            raise UsageError(f"--temperature must be between 0 and 100 (0 = greedy), got {temperature!r}")
        if not _finite(top_p) or not 0 < top_p <= 1:
            raise UsageError(f"--top-p (top_p) must be in (0, 1], got {top_p!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise UsageError(f"--top-k (top_k) must be a non-negative integer (0 = off), got {top_k!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
        if not _finite(repetition_penalty) or not 0 < repetition_penalty <= 10:
            raise UsageError(f"--repeat-penalty (repetition_penalty) must be in (0, 10] (1 = off), got {repetition_penalty!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise UsageError("--stop strings must be non-empty text")
        if schema is not None:
            schema = ANY_JSON_OBJECT if schema == "json_object" else schema_text(schema)
        return cls(max_new_tokens, float(temperature), float(top_p), top_k, seed, stops, bool(ignore_eos),
                   float(repetition_penalty), schema)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "stop", "length"
    timings: dict[str, float] = field(default_factory=dict)
    context: int = 0  # the KV cache's capacity this generation ran with


class StopFilter:
    """Releases text as it streams, but never a stop string nor a possible beginning of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])),
                   default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class GenerationStream:
    """Iterate for text pieces as they decode. `tokens` grows as tokens are produced (a caller that
    stops early still knows what was generated); `result` holds the GenerationResult once the
    pieces are exhausted.

    `pieces` is a generator that yields text and returns the GenerationResult (stream_generation).
    """

    def __init__(self, pieces: Generator[str, None, GenerationResult], tokens: list[int]):
        self.tokens = tokens
        self.result: GenerationResult | None = None
        self._pieces = self._keeping_result(pieces)  # one iterator: a stream can be peeked, then read on

    def _keeping_result(self, pieces: Generator[str, None, GenerationResult]) -> Iterator[str]:
        self.result = yield from pieces

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Decoding:
    """One generation's state between its steps: the sampler's rng and recent tokens, the schema's constraint,
    the streaming detokenizer, the stop filter and the token budget. stream_generation runs one to its end;
    arbor_cli.batch runs several, a step of all of them at a time, so both read the same rules.

    pick(logits) -> the next token; accept(token) -> (text to emit, whether the generation ended); close()
    -> the held-back tail once it ends. `finish` is "eos", "stop" or "length" (the default until it ends)."""

    def __init__(self, lm: LoadedModel, tokenizer, prompt_ids: list[int], opts: GenerationOptions, room: int,
                 generated: list[int] | None = None):
        self.lm, self.opts = lm, opts
        self.eos = set() if opts.ignore_eos else set(tokenizer.eos_ids)
        self.rng = lm.new_rng(opts.seed)
        self.detok, self.stops = tokenizer.stream_decoder(), StopFilter(opts.stop)
        self.budget = min(opts.max_new_tokens, room)  # room: positions left in the cache after the prompt
        self.tokens: list[int] = generated if generated is not None else []
        self.text: list[str] = []
        self.finish = "length"
        self.penalised = opts.repetition_penalty != 1.0
        self.recent = deque(prompt_ids[-REPEAT_WINDOW:] if self.penalised else (), maxlen=REPEAT_WINDOW)
        self.constraint = TokenConstraint(tokenizer, opts.schema) if opts.schema is not None else None

    def pick(self, logits) -> int:
        if self.constraint is None:
            return self.lm.sample(logits, self.opts.sampling, self.rng, list(self.recent))
        return self.lm.sample(logits, self.opts.sampling, self.rng, list(self.recent),
                              allowed=self.constraint.allowed())

    def accept(self, token: int) -> tuple[str, bool]:
        """Take the sampled `token`: the text it releases, and True when the generation ends with it (then
        nothing more is decoded; `finish` says why)."""
        c = self.constraint
        if self.budget <= 0:
            return "", True
        if token in self.eos or (c is not None and c.accepting and token in c.eos_ids):
            self.finish = "eos"
            return "", True
        self.tokens.append(token)
        if c is not None:
            c.consume(token)
        piece = self.stops.push(self.detok.push(token))
        if piece:
            self.text.append(piece)
        if self.stops.stopped:
            self.finish = "stop"
            return piece, True
        if c is not None and c.finished:
            self.finish = "eos"
            return piece, True
        if len(self.tokens) >= self.budget:
            return piece, True
        if self.penalised:
            self.recent.append(token)
        return piece, False

    def close(self) -> str:
        """The text held back (a possible stop string's start, an incomplete character) once the generation
        ended, unless a stop string ended it."""
        if self.finish == "stop":
            return ""
        tail = self.stops.push(self.detok.flush()) + self.stops.flush()
        if tail:
            self.text.append(tail)
        return tail

    def result(self, prompt_tokens: int, t0: float, t1: float, t2: float, context: int) -> GenerationResult:
        """The GenerationResult, timed: t0 the prefill's start, t1 the first token's pick, t2 the end."""
        decode_steps = max(len(self.tokens) - 1, 0)
        timings = {
            "prompt_tokens": prompt_tokens,
            "generated_tokens": len(self.tokens),
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "prefill_tokens_per_s": prompt_tokens / (t1 - t0) if prompt_tokens and t1 > t0 else 0.0,
            "decode_tokens_per_s": decode_steps / (t2 - t1) if decode_steps and t2 > t1 else 0.0,
        }
        return GenerationResult("".join(self.text), self.tokens, self.finish, timings, context)


def stream_generation(lm: LoadedModel, tokenizer, cache, prompt_ids: list[int], opts: GenerationOptions,
                      *, chunk_size: int = 512, on_done=None, generated: list[int] | None = None,
                      prefill=None) -> Generator[str, None, GenerationResult]:
    """Prefill `prompt_ids` after what `cache` already holds, then decode; yields text pieces and
    returns the GenerationResult when the loop ends (normally or by a stop).

    `on_done(result)`, when given, receives that result too.
    `generated`, when given, receives each token as it is produced, so a caller interrupted mid-way
    (Ctrl-C) still knows what the cache holds. Room in the cache bounds max_new_tokens:
    generation ends with finish_reason "length" there. `prefill(ids, cache, chunk_size)`: the prompt's prefill
    (default: the backend's own; Model passes one that reports the tokens read).
    """
    run = Decoding(lm, tokenizer, prompt_ids, opts, cache.capacity - cache.length - len(prompt_ids), generated)
    t0 = time.perf_counter()
    logits = (prefill or lm.prefill)(prompt_ids, cache, chunk_size) if prompt_ids else None
    token = run.pick(logits) if logits is not None else None
    t1 = time.perf_counter()
    while token is not None:
        piece, ended = run.accept(token)
        if piece:
            yield piece
        if ended:
            break
        token = run.pick(lm.decode(token, cache))
    tail = run.close()
    if tail:
        yield tail
    result = run.result(len(prompt_ids), t0, t1, time.perf_counter(), cache.capacity)
    if on_done is not None:
        on_done(result)
    return result
