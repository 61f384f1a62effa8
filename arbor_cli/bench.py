"""Progressive context testing (the seed guide's idea, measured): for each context length, fill the
cache with a prompt, time the prefill, time greedy decode at that depth, and record peak memory;
stop at the first context that runs out of memory. Optionally the same on Hugging Face
transformers with the same weights, in the same process run, for a side-by-side ratio.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import ContextError, OutOfMemoryError, UsageError
from .generate import GenerationOptions

DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072)
DECODE_TOKENS = 64


@dataclass
class BenchRow:
    engine: str
    context: int
    prompt_tokens: int
    prefill_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    rope: str = "native"
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def parse_contexts(spec: str) -> list[int]:
    """'4k,16k,32768' -> [4096, 16384, 32768]."""
    out = []
    for part in filter(None, (p.strip().lower() for p in spec.split(","))):
        match = re.fullmatch(r"(\d+)(k?)", part)
        if not match or int(match.group(1)) <= 0:
            raise UsageError(f"--contexts takes sizes like 4k,16k,32768; got {part!r}")
        out.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not out:
        raise UsageError("--contexts is empty")
    return out


def prompt_for(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """Random token ids: what the kernels see does not depend on the text, and no tokenizer is timed."""
    return np.random.default_rng(seed).integers(100, vocab_size - 100, size=length).tolist()


def bench_arbor(model, context: int, decode_tokens: int = DECODE_TOKENS) -> BenchRow:
    lm = model.lm
    prompt = prompt_for(model.config.vocab_size, context - decode_tokens - 1)
    scaling = model.rope_scaling_for(context)
    row = BenchRow("arbor", context, len(prompt),
                   rope=f"{scaling['rope_type']} x{scaling['factor']:g}" if scaling else "native")
    cache = None
    try:
        lm.reset_peak_memory()
        cache = model.new_cache(context)
        greedy = GenerationOptions().sampling
        # warm-up: two chunks (a first one, and one after cached keys) so kernel selection, library
        # initialisation and autotuning are not timed; then the cache is emptied again
        warm = prompt[:2 * model.prefill_chunk]
        lm.sample(lm.prefill(warm, cache, model.prefill_chunk), greedy, None)
        cache.truncate(0)
        t0 = time.perf_counter()
        token = lm.sample(lm.prefill(prompt, cache, model.prefill_chunk), greedy, None)  # sample() syncs
        t1 = time.perf_counter()
        token = lm.sample(lm.decode(token, cache), greedy, None)  # first decode: graph capture, not timed
        t2 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            token = lm.sample(lm.decode(token, cache), greedy, None)
        t3 = time.perf_counter()
        row.prefill_s = t1 - t0
        row.prefill_tokens_per_s = len(prompt) / (t1 - t0)
        row.decode_tokens_per_s = (decode_tokens - 1) / (t3 - t2)
        row.peak_memory_bytes = lm.peak_memory()
    except (OutOfMemoryError, ContextError) as e:
        row.error = str(e)
    finally:
        del cache
    return row


def bench_transformers(checkpoint, device: str, dtype: str, context: int, decode_tokens: int = DECODE_TOKENS,
                       loaded: dict | None = None) -> BenchRow:
    """transformers eager on the same checkpoint directory (config.json + safetensors are HF's format)."""
    import torch
    import transformers

    row = BenchRow("transformers", context, context - decode_tokens - 1)
    cache = loaded if loaded is not None else {}
    if "model" not in cache:
        cache["model"] = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint.path, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    hf = cache["model"]
    ids = torch.tensor([prompt_for(hf.config.vocab_size, row.prompt_tokens)], device=device)
    if "warm" not in cache:  # as for arbor: library initialisation and kernel selection are not timed
        with torch.inference_mode():
            hf(ids[:, :1024], use_cache=True, logits_to_keep=1)
        cache["warm"] = True

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for i in range(decode_tokens):
                if i == 1:
                    sync()
                    t2 = time.perf_counter()
                out = hf(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()  # stream the token, as a generation loop does
            t3 = time.perf_counter()
        row.prefill_s = t1 - t0
        row.prefill_tokens_per_s = row.prompt_tokens / (t1 - t0)
        row.decode_tokens_per_s = (decode_tokens - 1) / (t3 - t2)
        if device.startswith("cuda"):
            row.peak_memory_bytes = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError as e:
        row.error = f"out of memory ({str(e).splitlines()[0][:100]})"
    return row


def run_bench(model, contexts: list[int], decode_tokens: int = DECODE_TOKENS, vs_hf: bool = False,
              on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Each context in order, arbor (and transformers) side by side; stops after the first failure."""
    rows: list[BenchRow] = []
    hf_state: dict = {}
    for context in contexts:
        for row in _rows_for(model, context, decode_tokens, vs_hf, hf_state):
            rows.append(row)
            if on_row:
                on_row(row)
        if any(r.error for r in rows if r.context == context and r.engine == "arbor"):
            break
    return rows


def _rows_for(model, context, decode_tokens, vs_hf, hf_state):
    yield bench_arbor(model, context, decode_tokens)
    if vs_hf:
        yield bench_transformers(model.checkpoint, model.device, model.dtype, context, decode_tokens, hf_state)
