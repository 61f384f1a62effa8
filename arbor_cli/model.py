"""The Python API: `load()` a model by name or path, then `logits`, `generate` and `chat`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .backend import LoadedModel, select_backend
from .config import ArborConfig
from .errors import BackendUnavailableError, ContextError, OutOfMemoryError, UsageError
from .planner import ContextPlan, choose_context, memory_budget, next_smaller
from .generate import GenerationOptions, GenerationResult, GenerationStream, stream_generation
from .rope import resolve_method, rope_frequencies, scaling_for_context

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_CONTEXT = 1 << 20
KV_BITS = (8, 16)
QUANTIZE = ("int8", "int4")  # weight-only quantization a backend may offer (torch: on CPU)


class Model:
    """A loaded model: its config, tokenizer and a backend's weights on a device."""

    def __init__(self, checkpoint, lm: LoadedModel, tokenizer: "Tokenizer", backend: str,
                 context: int | None = None, rope_method: str = "auto", prefill_chunk: int | None = None):
        self.checkpoint = checkpoint
        self.config: ArborConfig = checkpoint.config
        self.lm = lm
        self.tokenizer = tokenizer
        self.backend = backend
        self.context = context
        self.rope_method = rope_method
        self.prefill_chunk = prefill_chunk or getattr(lm, "prefill_chunk", 512)
        self._rope_key: tuple | None = None
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
    def rope_scaling_for(self, context: int) -> dict | None:
        """The rope_scaling arbor runs with at `context` tokens (None: the model's plain RoPE)."""
        return scaling_for_context(self.config, context, self.rope_method)

    def _prepare_rope(self, positions: int, seq_len: int | None = None) -> None:
        cfg = self.config.with_rope_scaling(self.rope_scaling_for(seq_len or positions))
        rope = rope_frequencies(cfg, seq_len or positions)
        key = (json.dumps(cfg.rope_scaling, sort_keys=True), rope.seq_len if cfg.rope_type == "dynamic" else 0,
               positions)
        if key != self._rope_key:
            self.lm.set_rope(rope, positions)
            self._rope_key = key

    def new_cache(self, capacity: int):
        """A KV cache for `capacity` tokens, with RoPE set up for that context."""
        self._prepare_rope(capacity)
        return self.lm.new_cache(capacity)

    def _reusable_cache(self, capacity: int):
        """One-shot generations reuse a cache of the same size: no re-allocation, and a CUDA graph
        captured for its buffers stays valid."""
        cached = getattr(self, "_scratch_cache", None)
        self._prepare_rope(capacity)
        if cached is None or cached.capacity != capacity:
            cached = self._scratch_cache = self.lm.new_cache(capacity)
        cached.truncate(0)
        return cached

    def plan(self, needed_tokens: int, requested: int | None = None) -> ContextPlan:
        """The context for `needed_tokens` on this machine now (see planner.py)."""
        mem = self.lm.memory()
        budget = memory_budget(mem.free_bytes, mem.total_bytes, resident_bytes=self.lm.weights_nbytes)
        plan = choose_context(self.config, needed_tokens, budget, self.lm.weights_nbytes, self.lm.kv_element_bytes,
                              self.lm.act_element_bytes, self.prefill_chunk,
                              requested=self.context if requested is None else requested,
                              kv_scale_bytes=getattr(self.lm, "kv_scale_bytes", 0))
        scaling = self.rope_scaling_for(plan.context)
        if plan.scaled and scaling and (plan.context, scaling["rope_type"]) not in self._announced:
            self._announced.add((plan.context, scaling["rope_type"]))
            how = "the model's own" if self.config.rope_scaling else (
                "chosen by --rope auto" if (self.rope_method or "auto") == "auto" else "as asked")
            self.notify(f"context {plan.context} is beyond the model's trained {self.config.trained_context} tokens: "
                        f"RoPE {scaling['rope_type']} scaling, factor {scaling.get('factor', 1.0):g} ({how})")
        return plan

    def capacity_for(self, needed: int) -> int:
        return self.plan(needed).context

    # ---- the API --------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: a full forward pass over `ids`, no cache."""
        ids = self._check_ids(ids)
        self._prepare_rope(len(ids), seq_len=max(len(ids), self.context or 0))
        return self.lm.logits(ids)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Iterable[str] | None = None,
                 ignore_eos: bool = False, stream: bool = False, add_special_tokens: bool = True,
                 repetition_penalty: float = 1.0
                 ) -> GenerationResult | GenerationStream:
        """Complete `prompt` (text, or token ids used as they are). temperature 0 is greedy."""
        opts = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
                                       repetition_penalty)
        ids = self._check_ids(prompt) if isinstance(prompt, list) else \
            self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return self._run(ids, opts, stream)

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, **options) -> GenerationResult | GenerationStream:
        """Reply to `messages` ([{"role": ..., "content": ...}]) through the model's chat template."""
        opts = GenerationOptions.build(**options)
        return self._run(self.tokenizer.encode_chat(messages, add_generation_prompt=True), opts, stream)

    def _run(self, ids: list[int], opts: GenerationOptions, stream: bool):
        if not ids:
            raise UsageError("the prompt is empty")
        capacity = self.capacity_for(len(ids) + opts.max_new_tokens)
        if len(ids) >= capacity:
            raise ContextError(f"the prompt has {len(ids)} tokens but the context holds {capacity}; "
                               "shorten it or raise --context")
        holder = GenerationStream(iter(()))
        pieces = self._pieces_retrying_smaller(ids, opts, capacity, holder)
        if stream:
            holder._pieces = pieces
            return holder
        for _ in pieces:
            pass
        return holder.result

    def _pieces_retrying_smaller(self, ids: list[int], opts: GenerationOptions, capacity: int,
                                 holder: GenerationStream):
        """Generate at `capacity`; out of memory before the first piece, retry once at the next smaller
        context bucket when the prompt fits it (the answer then gets the room that is left) and say so.
        A context the user set (--context) is kept: that error is theirs to see."""
        yielded = False
        try:
            for piece in self._pieces(ids, opts, capacity, holder):
                yielded = True
                yield piece
            return
        except OutOfMemoryError as e:
            smaller = next_smaller(capacity)
            if yielded or self.context is not None or smaller is None or len(ids) >= smaller:
                raise
            self._scratch_cache = None  # let the failed context's cache go before allocating the smaller one
            self.notify(f"{e} at a {capacity:,}-token context; retrying once at {smaller:,} tokens")
        yield from self._pieces(ids, opts, smaller, holder)

    def _pieces(self, ids: list[int], opts: GenerationOptions, capacity: int, holder: GenerationStream):
        cache = self._reusable_cache(capacity)
        return stream_generation(self.lm, self.tokenizer, cache, ids, opts, chunk_size=self.prefill_chunk,
                                 on_done=lambda r: setattr(holder, "result", r))

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("no tokens given")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


def load(model: str | None = None, backend: str | None = None, device: str | None = None, dtype: str | None = None,
         context: int | None = None, quiet: bool = False, rope: str = "auto", kv_bits: int = 16,
         quantize: str | None = None) -> Model:
    """Load a model by registry name, `hf:ORG/NAME`, or path (HF dir, Arbor dir, .gguf file).

    kv_bits: 16 keeps the KV cache in the model's dtype; 8 stores it as int8 with a float16 scale
    per head and token, about half the memory of a 16-bit cache (docs/long-context.md).
    quantize: None keeps the weights as loaded; "int8" (per output channel) or "int4" (groups of 32)
    quantizes the Linear weights at load time for faster CPU decode (docs/performance.md).
    """
    import arbor_weights

    from .tokenizer import load_tokenizer

    if context is not None and (not isinstance(context, int) or not 16 <= context <= MAX_CONTEXT):
        raise UsageError(f"context must be an integer in 16..{MAX_CONTEXT}, got {context!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise UsageError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    try:
        resolve_method(rope)
    except ValueError as e:
        raise UsageError(str(e)) from None
    checkpoint = arbor_weights.resolve(model or arbor_weights.DEFAULT_MODEL, quiet=quiet)
    module = select_backend(backend)
    if quantize is not None:
        if quantize not in getattr(module, "QUANTIZE_MODES", ()):
            raise BackendUnavailableError(f"the {module.NAME} backend does not support quantize={quantize!r}")
        lm = module.load(checkpoint, device=device, dtype=dtype, kv_bits=kv_bits, quantize=quantize)
    else:
        lm = module.load(checkpoint, device=device, dtype=dtype, kv_bits=kv_bits)
    m = Model(checkpoint, lm, load_tokenizer(checkpoint.path), module.NAME, context=context, rope_method=rope)
    if context is not None:
        m.plan(context)  # refuse at load time a --context that cannot fit
    return m
