"""What a training run (train.py) reads: text tokenized, packed into rows, visited in a seeded order.

Documents are tokenized with the model's own tokenizer and joined by its end-of-text token, then cut
into rows of seq_len + 1 tokens (inputs and their next-token targets). The order the rows are visited
in is fixed by the seed, so step s always sees the same sequences, however often the run is resumed.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from arbor_core.errors import UsageError


def training_rows(checkpoint, texts: Iterable[str], seq_len: int) -> tuple[np.ndarray, int]:
    """`texts` tokenized by the checkpoint's tokenizer (one at a time, in order) and packed (pack): the
    rows, and how many tokens the texts were."""
    from arbor_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint.path)
    documents = [tokenizer.encode(text) for text in texts]
    separator = (checkpoint.config.eos_token_ids or [None])[0]
    return pack(documents, seq_len, separator), sum(len(d) for d in documents)


def pack(documents: list[list[int]], seq_len: int, separator: int | None) -> np.ndarray:
    """The documents' ids joined (by `separator`), cut into rows of seq_len + 1 that overlap by one (the
    last token of a row is the first target of the next)."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(doc)
        if separator is not None:
            ids.append(separator)
    rows = (len(ids) - 1) // seq_len
    if rows < 1:
        raise UsageError(f"the data has {len(ids):,} tokens, fewer than one sequence of {seq_len + 1:,}")
    flat = np.asarray(ids[:rows * seq_len + 1], dtype=np.int64)
    return np.lib.stride_tricks.sliding_window_view(flat, seq_len + 1)[::seq_len].copy()


class Batches:
    """Which rows each (step, micro-batch) reads: a seeded permutation, repeated as needed."""

    def __init__(self, rows: np.ndarray, batch: int, grad_accum: int, seed: int):
        self.rows, self.batch, self.grad_accum = rows, batch, grad_accum
        self.order = np.random.default_rng(seed).permutation(len(rows))

    def get(self, step: int, micro: int, device) -> torch.Tensor:
        first = (step * self.grad_accum + micro) * self.batch
        picks = [self.order[(first + r) % len(self.order)] for r in range(self.batch)]
        return torch.from_numpy(self.rows[picks]).to(device)

    def micro_batches(self, step: int, device):
        """The step's grad_accum micro-batches, each read when it is reached."""
        return (self.get(step, micro, device) for micro in range(self.grad_accum))
