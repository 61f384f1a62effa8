"""Progressive context testing: for each context length, fill the cache with a prompt, time the
prefill, time greedy decode at that depth, and record peak memory; stop at the first context that
runs out of memory. Optionally the same on a peer in the same process run, for a side-by-side ratio:
Hugging Face transformers with the same weights (it lives with the torch backend: it needs torch), or
llama.cpp on the GGUF file (llama_cpp_peer.py).
"""

from __future__ import annotations

import time
from typing import Callable

from arbor_core.bench_rows import DECODE_TOKENS, BenchRow, prompt_for
from arbor_core.errors import ContextError, OutOfMemoryError
from arbor_core.planner import parse_token_counts

from .backends import transformers_peer
from .generate import GenerationOptions

DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072)


def parse_contexts(spec: str) -> list[int]:
    """'4k,16k,32768' -> [4096, 16384, 32768], in the order given."""
    return parse_token_counts(spec, "--contexts")


def bench_arbor(model, context: int, decode_tokens: int = DECODE_TOKENS) -> BenchRow:
    prompt = prompt_for(model.config.vocab_size, context - decode_tokens - 1)
    scaling = model.rope_scaling_for(context)
    row = BenchRow("arbor", context, len(prompt),
                   rope=f"{scaling['rope_type']} x{scaling['factor']:g}" if scaling else "native")
    try:
        timed = time_prefill_decode(model, prompt, context, decode_tokens)
    except (OutOfMemoryError, ContextError) as e:
        row.error = str(e)
        return row
    row.prefill_s = timed["prefill_s"]
    row.prefill_tokens_per_s = len(prompt) / timed["prefill_s"]
    row.decode_tokens_per_s = (decode_tokens - 1) / timed["decode_s"]
    row.peak_memory_bytes = timed["peak_memory_bytes"]
    return row


def time_prefill_decode(model, prompt: list[int], context: int, decode_tokens: int) -> dict[str, float]:
    """Greedy prefill of `prompt` and `decode_tokens` decode steps at `context` on `model` (a Model), timed.

    Warm-up first: two chunks (a first one, and one after cached keys) so kernel selection,
    library initialisation and autotuning are not timed; then the cache is emptied again. The
    first decode step (a CUDA graph's capture) is not timed either.
    """
    lm, chunk, greedy = model.lm, model.prefill_chunk, GenerationOptions().sampling
    lm.reset_peak_memory()
    cache = model.new_cache(context)
    lm.sample(lm.prefill(prompt[:2 * chunk], cache, chunk), greedy, None)
    cache.truncate(0)
    t0 = time.perf_counter()
    token = lm.sample(lm.prefill(prompt, cache, chunk), greedy, None)  # sample() syncs
    t1 = time.perf_counter()
    token = lm.sample(lm.decode(token, cache), greedy, None)
    t2 = time.perf_counter()
    for _ in range(decode_tokens - 1):
        token = lm.sample(lm.decode(token, cache), greedy, None)
    t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "peak_memory_bytes": lm.peak_memory()}


PEERS = ("hf", "llama.cpp")  # transformers on the same checkpoint; llama.cpp on the GGUF it came from


def run_bench(model, contexts: list[int], decode_tokens: int = DECODE_TOKENS, vs: str = "",
              on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Each context in order, arbor first (as loaded: the default configuration unless flags said
    otherwise), then the peer `vs` ('', or one of PEERS); stops after arbor's first failure."""
    rows: list[BenchRow] = []
    peer_state: dict = {}
    for context in contexts:
        for row in _rows_for(model, context, decode_tokens, vs, peer_state):
            rows.append(row)
            if on_row:
                on_row(row)
        if any(r.error for r in rows if r.context == context and r.engine == "arbor"):
            break
    return rows


def _rows_for(model, context, decode_tokens, vs, peer_state):
    yield bench_arbor(model, context, decode_tokens)
    if vs == "hf":
        yield transformers_peer().bench(model.checkpoint, model.device, model.dtype, context, decode_tokens,
                                        peer_state)
    elif vs == "llama.cpp":
        from . import llama_cpp_peer

        yield llama_cpp_peer.bench(model.checkpoint, context, decode_tokens, peer_state)
