"""The Python API: `load()` a model by name or path, then `logits`, `generate`, `chat`, `stream`, `score`.

`Model` is the door (arbor_core.door.Door) to a backend loaded here: every caller (the CLI, chat,
the summariser, ask, serve, evals, bench) holds a Model and never the backend's loaded object (`lm`).
Context length and RoPE method are arguments of a call; the Model's own `context` and `rope_method`
are the defaults load() set. A long-lived context is a Session (session.py), which owns prefix reuse.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from arbor_core.backend import LoadedModel
from arbor_core.config import ArborConfig
from arbor_core.errors import ContextError, OutOfMemoryError, UsageError
from arbor_core.planner import (
    BUCKETS,
    MAX_BATCH,
    ContextPlan,
    batch_that_fits,
    bucket_table,
    choose_context,
    kv_cache_tokens,
    largest_fitting,
    memory_budget,
    smaller_after_out_of_memory,
)
from arbor_core.rope import CONTEXT_DEPENDENT, RopeTables, rope_frequencies, scaling_for_context

from .batch import Batch
from .generate import GenerationOptions, GenerationResult, GenerationStream, stream_generation
from .log_probs import log_probs_of, logits_to_numpy, negative_log_likelihood  # noqa: F401 (the API's)
from .mapping import BatchEvent, map_in_order
from .session import Session

if TYPE_CHECKING:
    import numpy as np

    from arbor_core.tokenizer import Tokenizer

MAX_CONTEXT = 1 << 20
SCORE_CHUNK = 256  # positions whose logits score_prompt holds at once (256 x a 49K vocabulary: 50 MB)
KV_BITS = (8, 16)
QUANTIZE = ("int8", "int4")  # weight-only quantization a backend may offer (torch: on CPU)
DTYPES = ("float32", "bfloat16", "float16")  # float weight precisions every backend runs


class Model:
    """A loaded model: its config, tokenizer and a backend's weights on a device."""

    def __init__(self, checkpoint, lm: LoadedModel, tokenizer: "Tokenizer", backend: str,
                 context: int | None = None, rope_method: str = "auto", prefill_chunk: int | None = None):
        self.checkpoint = checkpoint
        self.config: ArborConfig = checkpoint.config
        self.lm = lm
        self.tokenizer = tokenizer
        self.backend = backend
        self.context = context  # the default context of every call (load's --context); None: planned per call
        self.rope_method = rope_method  # the default RoPE method of every call
        self.prefill_chunk = prefill_chunk or lm.prefill_chunk
        self._rope_tables: dict[tuple, RopeTables] = {}
        self._scratch_cache = None
        self._announced: set[tuple] = set()
        self.notify: Callable[[str], None] = lambda message: None  # the CLI routes these to stderr
        # (done, total) after each chunk of a prefill longer than one chunk: the CLI's progress shows the tokens read
        self.on_prefill: Callable[[int, int], None] | None = None

    @property
    def device(self) -> str:
        return self.lm.device

    @property
    def dtype(self) -> str:
        return self.lm.dtype

    def num_parameters(self) -> int:
        return self.lm.num_parameters()

    # ---- RoPE and caches ------------------------------------------------------------------
    def rope_scaling_for(self, context: int, rope: str | None = None) -> dict | None:
        """The rope_scaling arbor runs with at `context` tokens (None: the model's plain RoPE)."""
        return scaling_for_context(self.config, context, rope or self.rope_method)

    def rope_tables(self, context: int, rope: str | None = None) -> RopeTables:
        """The RoPE tables for running at `context` tokens with `rope` (default: the model's method),
        built once per distinct scaling, so a backend sees the same object and keeps its cos/sin."""
        cfg = self.config.with_rope_scaling(self.rope_scaling_for(context, rope))
        key = (json.dumps(cfg.rope_scaling, sort_keys=True), context if cfg.rope_type in CONTEXT_DEPENDENT else 0)
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_frequencies(cfg, context)
        return self._rope_tables[key]

    def new_cache(self, capacity: int, rope: str | None = None):
        """A KV cache for `capacity` tokens that runs with the RoPE for that context (`rope`, default:
        the model's method): a cache knows its RoPE, so caches of several contexts can be mixed."""
        return self.lm.new_cache(capacity, self.rope_tables(capacity, rope))

    def _reusable_cache(self, capacity: int, rope: str | None = None):
        """One-shot generations reuse a cache of the same size: no re-allocation, and a CUDA graph
        captured for its buffers stays valid. Emptied, it takes the RoPE this generation runs with."""
        if self._scratch_cache is None or self._scratch_cache.capacity != capacity:
            self._scratch_cache = None  # the old cache goes before the new one is allocated
            self._scratch_cache = self.new_cache(capacity, rope)
        self._scratch_cache.truncate(0)
        self._scratch_cache.rope = self.rope_tables(capacity, rope)
        return self._scratch_cache

    # ---- planning -------------------------------------------------------------------------
    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None) -> ContextPlan:
        """The context for `needed_tokens` on this machine now (see planner.py); `requested` (default:
        the model's context) is honoured exactly or refused."""
        plan = choose_context(self.config, needed_tokens, self._budget(), self.lm.weights_nbytes,
                              self.lm.kv_element_bytes, self.lm.act_element_bytes, self.prefill_chunk,
                              requested=self.context if requested is None else requested,
                              kv_scale_bytes=self.lm.kv_scale_bytes)
        self._announce_scaling(plan, rope)
        return plan

    def _budget(self, mem=None) -> int:
        mem = mem or self.lm.memory()
        return memory_budget(mem.free_bytes, mem.total_bytes, resident_bytes=self.lm.weights_nbytes)

    def _announce_scaling(self, plan: ContextPlan, rope: str | None) -> None:
        scaling = self.rope_scaling_for(plan.context, rope)
        if not (plan.scaled and scaling) or (plan.context, scaling["rope_type"]) in self._announced:
            return
        self._announced.add((plan.context, scaling["rope_type"]))
        how = "the model's own" if self.config.rope_scaling else (
            "chosen by --rope auto" if (rope or self.rope_method or "auto") == "auto" else "as asked")
        self.notify(f"context {plan.context} is beyond the model's trained {self.config.trained_context} tokens: "
                    f"RoPE {scaling['rope_type']} scaling, factor {scaling.get('factor', 1.0):g} ({how})")

    def smaller_context(self, error: OutOfMemoryError, context: int, *, needed: int = 0, pinned: bool = False) -> int:
        """The out-of-memory policy (planner.smaller_after_out_of_memory); the failed context's cache goes
        before the smaller one is allocated."""
        smaller = smaller_after_out_of_memory(error, context, needed=needed, pinned=pinned)
        self._scratch_cache = None
        return smaller

    def batch_size(self, context: int, most: int = MAX_BATCH) -> int:
        """How many sequences of `context` tokens one batched step runs on this machine now (at least 1):
        the planner's batch_that_fits over free memory, at most `most`."""
        lm = self.lm
        return max(1, batch_that_fits(self.config, context, self._budget(), lm.weights_nbytes, lm.kv_element_bytes,
                                      lm.act_element_bytes, self.prefill_chunk, lm.kv_scale_bytes, most))

    def session_context(self) -> int:
        """The one rule for a long-lived session's context: the user's --context, else the bucket planned
        for the model's trained context on this machine now."""
        return self.plan(self.context or self.config.trained_context).context

    def memory_report(self) -> dict:
        """The machine, the model, and the context buckets that fit its free memory now (`arbor info`)."""
        mem, lm, config = self.lm.memory(), self.lm, self.config
        rows = bucket_table(config, self._budget(mem), lm.weights_nbytes, lm.kv_element_bytes, lm.act_element_bytes,
                            self.prefill_chunk, kv_scale_bytes=lm.kv_scale_bytes)
        return {
            "backend": self.backend, "device": self.device, "dtype": self.dtype,
            "memory_total_bytes": mem.total_bytes, "memory_free_bytes": mem.free_bytes,
            "model": self.checkpoint.name, "parameters": self.num_parameters(), "weights_bytes": lm.weights_nbytes,
            "output_head_parameters": 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size,
            "trained_context": config.trained_context, "max_context": largest_fitting(rows),
            "rope_method": self.rope_method, "kv_bits": lm.kv_bits, "quantize": lm.quantize,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            # sequences of the session context one batched step runs (serve --parallel's default), and that context
            "batch": self.batch_size(self.session_context()), "batch_context": self.session_context(), "sliding_window": config.sliding_window,
            "kv_cached_tokens_max": kv_cache_tokens(config, BUCKETS[-1], self.prefill_chunk),
            # layers that keep the whole context (the rest keep their window): Gemma 3's global layers
            "full_context_layers": sum(w is None for w in config.layer_windows), "layers": config.num_hidden_layers,
            "buckets": [{"context": r.context, "bytes": r.bytes, "fits": r.fits,
                         "rope_scaling": self.rope_scaling_for(r.context)} for r in rows],
        }

    # ---- the API --------------------------------------------------------------------------
    def logits(self, ids: list[int], *, context: int | None = None, rope: str | None = None) -> np.ndarray:
        """float32 [len(ids), vocab]: a full forward pass over `ids`, no cache, with the RoPE the model
        runs at `context` (default: the model's context, at least len(ids))."""
        ids = self._check_ids(ids)
        return self.lm.logits(ids, self.rope_tables(max(len(ids), context or self.context or 0), rope))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Iterable[str] | None = None,
                 ignore_eos: bool = False, stream: bool = False, add_special_tokens: bool = True,
                 repetition_penalty: float = 1.0, *, context: int | None = None, rope: str | None = None,
                 schema: Any = None) -> GenerationResult | GenerationStream:
        """Complete `prompt` (text, or token ids used as they are). temperature 0 is greedy. `schema`: a JSON
        schema (dict or JSON text) or "json_object" the answer is held to, token by token."""
        opts = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                       repetition_penalty, schema)
        ids = self._check_ids(prompt) if isinstance(prompt, list) else \
            self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return _finished(self.stream(ids, opts, context=context, rope=rope), stream)

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, *, context: int | None = None,
             rope: str | None = None, session: Session | None = None, continuing: bool = False,
             **options) -> GenerationResult | GenerationStream:
        """Reply to `messages` ([{"role": ..., "content": ...}]) through the model's chat template."""
        opts = GenerationOptions.build(**options)
        return _finished(self.stream(messages, opts, session=session, continuing=continuing, context=context,
                                     rope=rope), stream)

    def export_cache(self, cache) -> dict:
        """The cache's valid positions as host arrays (doc_cache keeps a document's on disk)."""
        return self.lm.export_cache(cache)

    def import_cache(self, arrays: dict, capacity: int, rope: str | None = None):
        """A new cache of `capacity` (RoPE method `rope`, as new_cache) holding exported positions."""
        return self.lm.import_cache(arrays, capacity, self.rope_tables(capacity, rope))

    def runtime(self) -> dict:
        """What a cache this model makes depends on besides its weights: KV precision, device, dtypes."""
        lm = self.lm
        return {"kv_bits": lm.kv_bits, "backend": self.backend, "device": str(lm.device), "dtype": lm.dtype,
                "quantize": lm.quantize}

    # ---- sessions ---------------------------------------------------------------------------
    def session(self, context: int | None = None, rope: str | None = None) -> Session:
        """A new, empty Session of `context` tokens (default: session_context()); its cache is made on first use."""
        return Session(self, context or self.session_context(), rope)

    def _cache_of(self, session: Session, cache=None):
        """The session's cache, made on first use (or `cache`, one of new_caches' made for a batch)."""
        if session.cache is None:
            session.cache = cache if cache is not None else self.new_cache(session.context, session.rope)
            # a ring bounds the rows of one prefill step (the backend cuts its chunks to it)
            rows = min(self.prefill_chunk, getattr(session.cache, "max_chunk", self.prefill_chunk))
            session.grain = 1 if self.lm.exact_across_row_counts else rows
        return session.cache

    def prefill(self, ids: list[int], session: Session) -> None:
        """`session` takes `ids` after what it holds, answering nothing: a document kept for later questions."""
        if ids:
            held = session.ids
            self._prefill(self._check_ids(ids), self._cache_of(session), self.prefill_chunk)
            session.hold(held + list(ids), start=len(held))

    def _prefill(self, ids: list[int], cache, chunk_size: int):
        """The backend's prefill, said chunk by chunk to `on_prefill` when one is set and `ids` take more than one
        chunk: the backend is called once per chunk, each starting where the backend's own chunks would (at
        multiples of the rows one step takes), so the cache and the logits are the same as one call's."""
        rows = min(chunk_size, getattr(cache, "max_chunk", chunk_size))
        hook = self.on_prefill
        if hook is None or len(ids) <= rows:
            return self.lm.prefill(ids, cache, chunk_size)
        logits = None
        for begin in range(0, len(ids), rows):
            logits = self.lm.prefill(ids[begin:begin + rows], cache, chunk_size)
            hook(min(begin + rows, len(ids)), len(ids))
        return logits

    def score_prompt(self, ids: list[int], session: Session | None = None) -> list[float]:
        """The log-probability (nats) the model gives each of ids[1:], given the ids before it and what
        `session` holds (its ids then include these): how expected a continuation is after that session
        (ask ranks a document's parts by how well each predicts the question). Without a session, `ids`
        are scored alone, at a context planned for them."""
        if session is None:
            return self._log_probs_after(ids, self._reusable_cache(self.plan(len(ids)).context))
        held = session.ids
        scored = self._log_probs_after(ids, self._cache_of(session))
        session.hold(held + list(ids), start=len(held), rows=SCORE_CHUNK)
        return scored

    def _log_probs_after(self, ids: list[int], cache) -> list[float]:
        """score_prompt's work on a cache: prefill `ids` after what it holds, scoring each of ids[1:]."""
        ids = self._check_ids(ids)
        scored: list[float] = []
        for begin in range(0, len(ids), SCORE_CHUNK):  # a chunk's logits are [chunk, vocab]: keep them few
            chunk = ids[begin:begin + SCORE_CHUNK]
            z = logits_to_numpy(self.lm.prefill(chunk, cache, self.prefill_chunk, every=True))
            scored += log_probs_of(z, ids[begin + 1:begin + 1 + len(chunk)])  # the next chunk's first id closes this one
        return scored

    def batch(self, slots: int, context: int | None = None, rope: str | None = None) -> Batch:
        """`slots` Sessions of `context` tokens (default: session_context()) whose generations decode together,
        each joining at the next step and leaving when it ends (batch.py): continuous batching."""
        batch = Batch(self, slots, context or self.session_context(), rope)
        for session, cache in zip(batch.sessions, self.lm.new_caches(slots, batch.context,
                                                                      self.rope_tables(batch.context, rope))):
            self._cache_of(session, cache)
        return batch

    def stream_many(self, prompts: list, options: GenerationOptions | list[GenerationOptions], *,
                    context: int | None = None, rope: str | None = None, parallel: int | None = None
                    ) -> Iterator[BatchEvent]:
        """Several prompts' generations, decoded together: BatchEvent(index, text, result) as each prompt's
        text comes, the last of each index carrying its GenerationResult. `options`: one for all, or one per
        prompt (temperature, top_p, seed, max tokens, stop: each its own). `parallel` sequences run at once
        (default: as many as fit at the context, batch_size); the rest join as others end. The context is
        `context` (default: the model's, else planned for the longest prompt and its answer)."""
        prompts = [self.tokenizer.encode_chat(p, add_generation_prompt=True) if _is_chat(p) else self._check_ids(p)
                   for p in prompts]
        each = list(options) if isinstance(options, (list, tuple)) else [options] * len(prompts)
        if len(each) != len(prompts):
            raise UsageError(f"{len(prompts)} prompts but {len(each)} options")
        if not prompts:
            return iter(())
        needed = max(len(p) + o.max_new_tokens for p, o in zip(prompts, each))
        capacity = self.plan(needed, requested=context, rope=rope).context
        slots = min(len(prompts), parallel or self.batch_size(capacity))
        return self._stream_batch(self.batch(slots, capacity, rope), prompts, each)

    @staticmethod
    def _stream_batch(batch: Batch, prompts: list[list[int]], options: list[GenerationOptions]
                      ) -> Iterator[BatchEvent]:
        waiting = list(range(len(prompts)))
        while waiting or batch.running:
            while waiting and batch.free:
                i = waiting.pop(0)
                batch.add(prompts[i], options[i], key=i)
            for event in batch.step():
                yield BatchEvent(event.sequence.key, event.text, event.result)

    def map(self, work: Callable[[Any], Any], items: Iterable[Any], on_done: Callable[[], None] | None = None
            ) -> Iterator[Any]:
        """work(item) for every item, in order, one at a time: one model here runs one generation at a time."""
        return map_in_order(work, items, on_done)

    def kv_bytes_per_token(self) -> int:
        """Bytes one position of this model's KV cache takes (all layers, K and V, scales included)."""
        return self.config.kv_bytes_per_token(self.lm.kv_element_bytes, self.lm.kv_scale_bytes)

    def stream(self, prompt: list[int] | list[dict], options: GenerationOptions, *, session: Session | None = None,
               continuing: bool = False, context: int | None = None, rope: str | None = None) -> GenerationStream:
        """The one generation entry point: prefill the prompt (token ids, or chat messages rendered by the
        template), decode, stream text.

        With `session`, the prompt is the whole conversation: what the session holds of it is reused by
        its rule (session.py) and the rest prefilled, at the session's context and RoPE; `continuing`
        keeps all it holds. Without, the context is `context` (default: the model's, else planned for
        prompt + answer) and a one-shot cache is used; out of memory before the first piece, an unpinned
        context is retried once one bucket smaller (smaller_context).
        """
        ids = self.tokenizer.encode_chat(prompt, add_generation_prompt=True) if _is_chat(prompt) else prompt
        if not ids:
            raise UsageError("the prompt is empty")
        tokens: list[int] = []
        if session is not None:
            cache = self._cache_of(session)
            start = session.reuse(ids, continuing)
            session.hold(ids, start=start, generated=tokens)
            return GenerationStream(stream_generation(self.lm, self.tokenizer, cache, ids[start:], options,
                                                      chunk_size=self.prefill_chunk, generated=tokens,
                                                      prefill=self._prefill), tokens)
        capacity = self.plan(len(ids) + options.max_new_tokens, requested=context, rope=rope).context
        if len(ids) >= capacity:
            raise ContextError(f"the prompt has {len(ids)} tokens but the context holds {capacity}; "
                               "shorten it or raise --context")
        pinned = (context or self.context) is not None
        return GenerationStream(self._stream_with_oom_fallback(ids, options, capacity, rope, pinned, tokens), tokens)

    def _stream_with_oom_fallback(self, ids, options, capacity, rope, pinned, tokens):
        """Generate at `capacity`; out of memory before the first piece, once more one bucket smaller
        (the answer then gets the room that is left), saying so."""
        yielded = False
        try:
            pieces = self._one_shot(ids, options, capacity, rope, tokens)
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as done:
                    return done.value
                yielded = True
                yield piece
        except OutOfMemoryError as e:
            if yielded:
                raise
            smaller = self.smaller_context(e, capacity, needed=len(ids), pinned=pinned)
            self.notify(f"{e} at a {capacity:,}-token context; retrying once at {smaller:,} tokens")
        tokens.clear()
        return (yield from self._one_shot(ids, options, smaller, rope, tokens))

    def _one_shot(self, ids, options, capacity, rope, tokens):
        cache = self._reusable_cache(capacity, rope)
        return stream_generation(self.lm, self.tokenizer, cache, ids, options, chunk_size=self.prefill_chunk,
                                 generated=tokens, prefill=self._prefill)

    def score(self, ids: list[int], window: int, *, rope: str | None = None) -> float:
        """Mean negative log-likelihood (nats) of ids[-window:], each given all the ids before it, at a
        context of exactly len(ids) tokens.

        The context is prefilled in chunks (only the last position's logits are ever materialised),
        then the window is stepped through one decode at a time: each step's logits score the next id.
        """
        self.plan(len(ids), requested=len(ids), rope=rope)  # refuses what cannot fit, announces the RoPE scaling
        cache = self.new_cache(len(ids), rope)
        context, scored = ids[:-window], ids[-window:]
        logits = self.lm.prefill(context, cache, self.prefill_chunk)
        total = 0.0
        for i, target in enumerate(scored):
            total += negative_log_likelihood(logits_to_numpy(logits), target)
            if i + 1 < len(scored):
                logits = self.lm.decode(target, cache)
        return total / len(scored)

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("no tokens given")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


def _is_chat(prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], dict)


def _finished(stream: GenerationStream, keep_streaming: bool) -> GenerationResult | GenerationStream:
    if keep_streaming:
        return stream
    for _ in stream:
        pass
    return stream.result
