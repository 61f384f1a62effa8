"""The Python API: `load()` a model by name or path, then `logits`, `generate`, `chat`, `stream`, `score`.

`Model` is the one door to a backend: every caller (the CLI, ChatSession, the summariser, evals,
bench) holds a Model and never the backend's loaded object (`lm`). Context length and RoPE method
are arguments of a call; the Model's own `context` and `rope_method` are the defaults load() set.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from arbor_cli.backends import select_backend
from arbor_core.backend import LoadedModel
from arbor_core.config import ArborConfig
from arbor_core.errors import ContextError, OutOfMemoryError, UsageError
from arbor_core.planner import (
    BUCKETS,
    ContextPlan,
    bucket_table,
    choose_context,
    kv_cache_tokens,
    memory_budget,
    next_smaller,
)
from arbor_core.rope import RopeTables, resolve_method, rope_frequencies, scaling_for_context

from .generate import GenerationOptions, GenerationResult, GenerationStream, stream_generation

if TYPE_CHECKING:
    from arbor_core.tokenizer import Tokenizer

MAX_CONTEXT = 1 << 20
SCORE_CHUNK = 256  # positions whose logits prefill_log_probs holds at once (256 x a 49K vocabulary: 50 MB)
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
        key = (json.dumps(cfg.rope_scaling, sort_keys=True), context if cfg.rope_type == "dynamic" else 0)
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
        """The out-of-memory policy, for every caller: after `error` at `context`, retry once at the next
        smaller context bucket. Re-raises `error` when there is none, when the context was the user's
        (`pinned`: that error is theirs to see), or when `needed` tokens would not fit the smaller one."""
        smaller = next_smaller(context)
        if smaller is None or pinned or needed >= smaller:
            raise error
        self._scratch_cache = None  # let the failed context's cache go before allocating the smaller one
        return smaller

    def memory_report(self) -> dict:
        """The machine, the model, and the context buckets that fit its free memory now (`arbor info`)."""
        mem, lm = self.lm.memory(), self.lm
        kv_scale_bytes = lm.kv_scale_bytes
        rows = bucket_table(self.config, self._budget(mem), lm.weights_nbytes, lm.kv_element_bytes,
                            lm.act_element_bytes, self.prefill_chunk, kv_scale_bytes=kv_scale_bytes)
        fitting = [r.context for r in rows if r.fits]
        return {
            "backend": self.backend, "device": self.device, "dtype": self.dtype,
            "memory_total_bytes": mem.total_bytes, "memory_free_bytes": mem.free_bytes,
            "model": self.checkpoint.name, "parameters": self.num_parameters(), "weights_bytes": lm.weights_nbytes,
            "trained_context": self.config.trained_context, "max_context": fitting[-1] if fitting else 0,
            "rope_method": self.rope_method,
            "kv_bits": lm.kv_bits,
            "quantize": lm.quantize,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "sliding_window": self.config.sliding_window,
            "kv_cached_tokens_max": kv_cache_tokens(self.config, BUCKETS[-1], self.prefill_chunk),
            # layers that keep the whole context (the rest keep their window): Gemma 3's global layers
            "full_context_layers": sum(w is None for w in self.config.layer_windows),
            "layers": self.config.num_hidden_layers,
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
                 repetition_penalty: float = 1.0, *, context: int | None = None, rope: str | None = None
                 ) -> GenerationResult | GenerationStream:
        """Complete `prompt` (text, or token ids used as they are). temperature 0 is greedy."""
        opts = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                       repetition_penalty)
        ids = self._check_ids(prompt) if isinstance(prompt, list) else \
            self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return _finished(self.stream(ids, opts, context=context, rope=rope), stream)

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, *, context: int | None = None,
             rope: str | None = None, **options) -> GenerationResult | GenerationStream:
        """Reply to `messages` ([{"role": ..., "content": ...}]) through the model's chat template."""
        opts = GenerationOptions.build(**options)
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return _finished(self.stream(ids, opts, context=context, rope=rope), stream)

    def grow(self, depth: float = 1.0, width: float = 1.0, destination=None, seed: int = 0) -> "Model":
        """This model grown without changing what it computes (arbor_weights/grow.py: identity blocks for
        `depth`, split neurons and heads for `width`), written as a normal checkpoint at `destination`
        (default: under the cache, named for the growth) and loaded like this one."""
        from pathlib import Path

        import arbor_weights
        from arbor_weights.grow import grow_checkpoint

        if destination is None:
            name = f"{Path(str(self.checkpoint.path)).name}-grown-d{depth:g}-w{width:g}-s{seed}"
            destination = arbor_weights.cache_dir() / "grown" / name
            if Path(destination).is_dir() and (Path(destination) / "config.json").is_file():
                return load(str(destination), backend=self.backend, device=str(self.device), quiet=True,
                            kv_bits=self.lm.kv_bits, dtype=self.dtype)
        path, _, _ = grow_checkpoint(self.checkpoint, destination, depth, width, seed)
        return load(str(path), backend=self.backend, device=str(self.device), quiet=True, kv_bits=self.lm.kv_bits,
                    dtype=self.dtype)

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

    def prefill(self, ids: list[int], cache) -> None:
        """Prefill `ids` after what `cache` holds, answering nothing: a document kept for later questions."""
        if ids:
            self.lm.prefill(self._check_ids(ids), cache, self.prefill_chunk)

    def prefill_log_probs(self, ids: list[int], cache) -> list[float]:
        """Prefill `ids` after what `cache` holds and return the log-probability (nats) the model gives each
        of ids[1:], given the cache and the ids before it: how expected a continuation is after that
        cache (ask.py ranks a document's parts by how well each predicts the question)."""
        ids = self._check_ids(ids)
        scored: list[float] = []
        for begin in range(0, len(ids), SCORE_CHUNK):  # a chunk's logits are [chunk, vocab]: keep them few
            chunk = ids[begin:begin + SCORE_CHUNK]
            z = logits_to_numpy(self.lm.prefill(chunk, cache, self.prefill_chunk, every=True))
            targets = ids[begin + 1:begin + 1 + len(chunk)]  # the next chunk's first id closes this one
            z = z[:len(targets)]
            top = z.max(axis=1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1, dtype=np.float64))
            scored += (z[np.arange(len(z)), targets] - log_norm).tolist()
        return scored

    def kv_bytes_per_token(self) -> int:
        """Bytes one position of this model's KV cache takes (all layers, K and V, scales included)."""
        return self.config.kv_bytes_per_token(self.lm.kv_element_bytes, self.lm.kv_scale_bytes)

    def stream(self, ids: list[int], options: GenerationOptions, *, cache=None, context: int | None = None,
               rope: str | None = None) -> GenerationStream:
        """The one generation entry point: prefill `ids`, decode, stream text.

        With `cache` (a live conversation's, from new_cache), `ids` follow what it holds and run with
        the RoPE it was built for. Without, the context is `context` (default: the model's, else
        planned for prompt + answer) and a one-shot cache is used; out of memory before the first
        piece, an unpinned context is retried once one bucket smaller (smaller_context).
        """
        if not ids:
            raise UsageError("the prompt is empty")
        tokens: list[int] = []
        if cache is not None:
            return GenerationStream(stream_generation(self.lm, self.tokenizer, cache, ids, options,
                                                      chunk_size=self.prefill_chunk, generated=tokens), tokens)
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
                                 generated=tokens)

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

    def time_prefill_decode(self, prompt: list[int], context: int, decode_tokens: int) -> dict[str, float]:
        """Greedy prefill of `prompt` and `decode_tokens` decode steps at `context`, timed (`arbor bench`).

        Warm-up first: two chunks (a first one, and one after cached keys) so kernel selection,
        library initialisation and autotuning are not timed; then the cache is emptied again. The
        first decode step (a CUDA graph's capture) is not timed either.
        """
        lm, greedy = self.lm, GenerationOptions().sampling
        lm.reset_peak_memory()
        cache = self.new_cache(context)
        warm = prompt[:2 * self.prefill_chunk]
        lm.sample(lm.prefill(warm, cache, self.prefill_chunk), greedy, None)
        cache.truncate(0)
        t0 = time.perf_counter()
        token = lm.sample(lm.prefill(prompt, cache, self.prefill_chunk), greedy, None)  # sample() syncs
        t1 = time.perf_counter()
        token = lm.sample(lm.decode(token, cache), greedy, None)
        t2 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            token = lm.sample(lm.decode(token, cache), greedy, None)
        t3 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "peak_memory_bytes": lm.peak_memory()}

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("no tokens given")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


def _finished(stream: GenerationStream, keep_streaming: bool) -> GenerationResult | GenerationStream:
    if keep_streaming:
        return stream
    for _ in stream:
        pass
    return stream.result


def negative_log_likelihood(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    top = z.max()
    return float(top + np.log(np.exp(z - top).sum()) - z[target])


def logits_to_numpy(logits) -> np.ndarray:
    """A backend's logits as numpy. Numpy's array protocol reads CPU tensors and MLX arrays; an
    accelerator tensor is first copied to the host through its `.cpu()`."""
    to_host = getattr(logits, "cpu", None)
    return np.asarray(to_host() if callable(to_host) else logits, dtype=np.float32)


def load(model: str | None = None, backend: str | None = None, device: str | None = None, dtype: str | None = None,
         context: int | None = None, quiet: bool = False, rope: str = "auto", kv_bits: int = 16,
         quantize: str | None = None) -> Model:
    """Load a model by registry name, `hf:ORG/NAME`, or path (HF dir, Arbor dir, .gguf file).

    kv_bits: 16 keeps the KV cache in the model's dtype; 8 stores it as int8 with a float16 scale
    per head and token, about half the memory of a 16-bit cache (docs/long-context.md).
    quantize: "int8" (per output channel) or "int4" (groups of 32) quantizes float Linear weights at load
    time for faster CPU decode (docs/performance.md). With neither quantize nor dtype, the backend picks:
    on a CPU a model stored with 4-bit layers (a Q4 GGUF) runs them as int4 with a compiled decode step;
    dtype="float32" asks for the exact float path instead.
    """
    import arbor_weights
    from arbor_core.tokenizer import load_tokenizer

    if context is not None and (not isinstance(context, int) or not 16 <= context <= MAX_CONTEXT):
        raise UsageError(f"--context must be an integer in 16..{MAX_CONTEXT}, got {context!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise UsageError(f"--kv-bits (kv_bits) must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    try:
        resolve_method(rope)
    except ValueError as e:
        raise UsageError(str(e)) from None
    module = select_backend(backend)  # a bad --backend fails before any model is fetched
    checkpoint = arbor_weights.resolve(model or arbor_weights.DEFAULT_MODEL, quiet=quiet)
    longer = arbor_weights.LONG_VARIANTS.get(checkpoint.name)
    if longer and rope == "auto" and context is not None and context > checkpoint.config.trained_context:
        # --rope auto beyond the trained context: the model's long-context adapter, where arbor ships one
        from arbor_weights.progress import Reporter

        Reporter(quiet=quiet).note(f"context {context:,} is beyond {checkpoint.name}'s trained "
                                   f"{checkpoint.config.trained_context:,} tokens: using {longer} (its long-context "
                                   "adapter; --rope yarn keeps the plain model)")
        checkpoint = arbor_weights.resolve(longer, quiet=quiet)
    lm = module.load(checkpoint, device=device, dtype=dtype, kv_bits=kv_bits, quantize=quantize)
    m = Model(checkpoint, lm, load_tokenizer(checkpoint.path), module.NAME, context=context, rope_method=rope)
    if context is not None:
        m.plan(context)  # refuse at load time a --context that cannot fit
    return m
