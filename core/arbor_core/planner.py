"""The memory model: how many tokens of context fit the memory this machine has free.

bytes(context) = weights + KV bytes/token x cached tokens + prefill workspace + safety margin.
Cached tokens are the context, except for sliding-window models, whose caches are rings of
window + one prefill chunk positions (kv_cache_tokens). KV bytes/token counts the scales of an
int8 cache (kv_scale_bytes). Pure functions over numbers, so tests drive them with fake memory sizes; the backend reports
free memory (CUDA mem_get_info, MLX's recommended working set, psutil's available RAM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ArborConfig
from .errors import ContextError, UsageError

BUCKETS = (4096, 8192, 16384, 32768, 65536, 131072)
MIN_MARGIN = 256 << 20  # interpreter, allocator slack and the framework's own buffers
MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class Bucket:
    context: int
    bytes: int  # weights + KV cache + prefill workspace (margin not included)
    fits: bool


@dataclass(frozen=True)
class ContextPlan:
    context: int
    needed_tokens: int
    bytes: int
    budget_bytes: int
    trained_context: int

    @property
    def scaled(self) -> bool:
        return self.context > self.trained_context

    @property
    def factor(self) -> float:
        return self.context / self.trained_context


def layer_cache_tokens(config: ArborConfig, context: int, chunk: int) -> list[int]:
    """Positions each layer's KV cache holds for `context` tokens: all of them, or for a layer with a
    sliding window (every layer of a Mistral, five in six of a Gemma 3) at most window + chunk - 1,
    enough for a chunk of `chunk` queries to see `window` keys each.

    The backends size their caches with this, so the planner and the allocation agree.
    """
    return [context if window is None else min(context, window + chunk - 1) for window in config.layer_windows]


def kv_cache_tokens(config: ArborConfig, context: int, chunk: int) -> int:
    """The most positions any layer's cache holds (layer_cache_tokens)."""
    return max(layer_cache_tokens(config, context, chunk))


def kv_bytes(config: ArborConfig, context: int, kv_element_bytes: int, chunk: int, kv_scale_bytes: int = 0) -> int:
    """The KV cache of a `context`: each layer's share of kv_bytes_per_token times what that layer holds."""
    per_layer_token = config.kv_bytes_per_token(kv_element_bytes, kv_scale_bytes) // config.num_hidden_layers
    return per_layer_token * sum(layer_cache_tokens(config, context, chunk))


def prefill_workspace_bytes(config: ArborConfig, context: int, chunk: int, act_element_bytes: int,
                            kv_scale_bytes: int = 0) -> int:
    """Peak transient memory of one prefill chunk: activations, the MLP's hidden, attention scores.

    Attention runs blockwise (SDPA's flash / memory-efficient kernels, and on CPU its fused
    kernel): scores are never chunk x heads x context. What remains is the mask and per-block
    buffers, measured on CPU at ~7 bytes per (query, key) pair (237 MiB for 512 x 64K); 8 is
    counted; Gemma's soft-capped attention, which no fused kernel runs, does hold chunk x heads x keys
    scores. The logits are only ever computed for the last position. A quantized cache
    (kv_scale_bytes > 0) is dequantized one layer at a time: K and V of that layer in the compute
    dtype (MLX may hold the converted codes beside the scaled result: counted twice).
    """
    keys = kv_cache_tokens(config, context, chunk)
    chunk = min(chunk, context)
    activations = chunk * (4 * config.hidden_size + 3 * config.intermediate_size) * act_element_bytes
    qkv = chunk * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim * act_element_bytes
    attention = chunk * keys * 8
    if config.attn_logit_softcapping is not None:  # soft-capped attention is written out: it holds float32 scores,
        attention += 3 * chunk * keys * config.num_attention_heads * 4  # about three copies at its peak
    dequantized = 4 * keys * config.num_key_value_heads * config.head_dim * act_element_bytes if kv_scale_bytes else 0
    return activations + qkv + attention + dequantized + config.vocab_size * 4


def bytes_for_context(config: ArborConfig, context: int, weights_bytes: int, kv_element_bytes: int,
                      act_element_bytes: int, chunk: int, kv_scale_bytes: int = 0) -> int:
    return (weights_bytes + kv_bytes(config, context, kv_element_bytes, chunk, kv_scale_bytes)
            + prefill_workspace_bytes(config, context, chunk, act_element_bytes, kv_scale_bytes))


MAX_BATCH = 16  # sequences one batched step runs at most by default (llama-server's -np, vLLM's max_num_seqs)


def batch_that_fits(config: ArborConfig, context: int, budget: int, weights_bytes: int, kv_element_bytes: int,
                    act_element_bytes: int, chunk: int, kv_scale_bytes: int = 0, most: int = MAX_BATCH) -> int:
    """How many sequences of `context` tokens run at once within `budget`: the weights, one prefill chunk's
    workspace (a batched step reads at most `chunk` prompt tokens, beside one decode row per sequence) and a
    KV cache of `context` per sequence, at most `most`; 0 when not even one fits."""
    one = kv_bytes(config, context, kv_element_bytes, chunk, kv_scale_bytes)
    rows = most * (4 * config.hidden_size + 3 * config.intermediate_size) * act_element_bytes
    room = (budget - weights_bytes - prefill_workspace_bytes(config, context, chunk, act_element_bytes, kv_scale_bytes)
            - rows - most * config.vocab_size * 4)
    return max(0, min(most, room // one))


def memory_budget(free_bytes: int, total_bytes: int, resident_bytes: int = 0) -> int:
    """What arbor may use: free memory plus what it already holds (loaded weights), less a margin."""
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * total_bytes))
    return max(0, free_bytes + resident_bytes - margin)


def bucket_table(config: ArborConfig, budget: int, weights_bytes: int, kv_element_bytes: int,
                 act_element_bytes: int, chunk: int, buckets: tuple[int, ...] = BUCKETS,
                 kv_scale_bytes: int = 0) -> list[Bucket]:
    rows = []
    for context in buckets:
        need = bytes_for_context(config, context, weights_bytes, kv_element_bytes, act_element_bytes, chunk,
                                 kv_scale_bytes)
        rows.append(Bucket(context, need, need <= budget))
    return rows


def choose_context(config: ArborConfig, needed_tokens: int, budget: int, weights_bytes: int, kv_element_bytes: int,
                   act_element_bytes: int, chunk: int, requested: int | None = None,
                   buckets: tuple[int, ...] = BUCKETS, kv_scale_bytes: int = 0) -> ContextPlan:
    """The smallest bucket that holds `needed_tokens` and fits `budget`.

    When no fitting bucket holds the input, the largest fitting bucket is returned (callers such
    as summarize then split the input). `requested` (--context) is honoured exactly or refused.
    """
    def cost(context: int) -> int:
        return bytes_for_context(config, context, weights_bytes, kv_element_bytes, act_element_bytes, chunk,
                                 kv_scale_bytes)

    if requested is not None:
        if cost(requested) > budget:
            fitting = [b for b in buckets if cost(b) <= budget]
            hint = f"; the largest that fits is {fitting[-1]}" if fitting else ""
            raise ContextError(f"--context {requested} needs {_gib(cost(requested))} but only {_gib(budget)} "
                               f"is available{hint}")
        return ContextPlan(requested, needed_tokens, cost(requested), budget, config.trained_context)
    fitting = [b for b in buckets if cost(b) <= budget]
    if not fitting:
        smallest = buckets[0]
        raise ContextError(f"even a {smallest}-token context needs {_gib(cost(smallest))} but only {_gib(budget)} "
                           "of memory is free; close other programs or use a smaller model")
    holding = [b for b in fitting if b >= needed_tokens]
    context = holding[0] if holding else fitting[-1]
    return ContextPlan(context, needed_tokens, cost(context), budget, config.trained_context)


def next_smaller(context: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    smaller = [b for b in buckets if b < context]
    return smaller[-1] if smaller else None


def smaller_after_out_of_memory(error: Exception, context: int, *, needed: int = 0, pinned: bool = False) -> int:
    """The out-of-memory policy, for every door: after `error` at `context`, retry once at the next
    smaller bucket. Re-raises `error` when there is none, when the context was the user's (`pinned`:
    that error is theirs to see), or when `needed` tokens would not fit the smaller one."""
    smaller = next_smaller(context)
    if smaller is None or pinned or needed >= smaller:
        raise error
    return smaller


def bucket_within(needed_tokens: int, largest: int, trained_context: int, requested: int | None = None
                  ) -> ContextPlan:
    """A plan where memory is not measured here (an engine's server holds `largest` tokens): the
    requested context, else the smallest bucket within `largest` that holds `needed_tokens`, else the
    largest bucket within it (`largest` itself when no bucket is)."""
    if requested is None:
        fitting = [b for b in BUCKETS if b <= largest] or [largest]
        holding = [b for b in fitting if b >= needed_tokens]
        requested = holding[0] if holding else fitting[-1]
    return ContextPlan(requested, needed_tokens, 0, 0, trained_context)


def largest_fitting(rows: list[Bucket]) -> int:
    """The largest bucket of `rows` (bucket_table) that fits; 0 when none does."""
    fitting = [r.context for r in rows if r.fits]
    return fitting[-1] if fitting else 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def parse_token_counts(spec: str, option: str) -> list[int]:
    """'4k,16k,32768' -> [4096, 16384, 32768]: token counts in the order given, 'k' meaning 1024;
    `option` (e.g. '--contexts') names the flag in the error."""
    counts = []
    for part in filter(None, (p.strip().lower() for p in spec.split(","))):
        match = re.fullmatch(r"(\d+)(k?)", part)
        if not match or int(match.group(1)) <= 0:
            raise UsageError(f"{option} takes token counts like 4k,16k,32768; got {part!r}")
        counts.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not counts:
        raise UsageError(f"{option} is empty")
    return counts
