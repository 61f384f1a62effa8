"""What one benchmark row holds and the prompt it is timed on: shared by arbor's own bench
(arbor_cli/bench.py) and the peers measured beside it (transformers in the torch backend, llama.cpp)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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


def prompt_for(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """Random token ids: what the kernels see does not depend on the text, and no tokenizer is timed."""
    return np.random.default_rng(seed).integers(100, vocab_size - 100, size=length).tolist()
