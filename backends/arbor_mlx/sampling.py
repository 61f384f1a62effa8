"""Picking the next token on the device, with the torch backend's semantics for every option (MLX).

`sample_lazy` returns the token as a lazy MLX scalar: nothing runs until its value is read, so the
runner can queue work on it first (MLXModel.sample).
"""

from __future__ import annotations

import secrets

import mlx.core as mx
import numpy as np

from arbor_core.backend import SamplingParams, allowed_over


class RandomKey:
    """A seeded PRNG key, split once per draw: the same seed gives the same tokens."""

    def __init__(self, seed: int | None):
        self.key = mx.random.key(secrets.randbits(62) if seed is None else seed)

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


def penalise_repeats(logits: mx.array, recent, penalty: float) -> mx.array:
    """HF / llama.cpp's repetition penalty: the scores of `recent` tokens divided by `penalty` when
    positive, multiplied when negative. A new array: the caller's logits are untouched."""
    hit = mx.zeros(logits.shape, dtype=mx.bool_)
    hit[mx.array(sorted(set(recent)))] = True
    return mx.where(hit, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


def keep_allowed(logits: mx.array, allowed: np.ndarray) -> mx.array:
    """`logits` with every token outside `allowed` (bool [n]; ids >= n are outside) at -inf."""
    return mx.where(mx.array(allowed_over(allowed, logits.shape[-1])), logits, -mx.inf)


def sample_lazy(logits: mx.array, params: SamplingParams, rng: RandomKey | None, recent=(),
                allowed: np.ndarray | None = None) -> mx.array:
    """The next token from (vocab,) logits, as a lazy scalar; with `allowed`, one of those tokens."""
    if allowed is not None:
        logits = keep_allowed(logits, allowed)
    if params.repetition_penalty != 1.0 and len(recent):
        logits = penalise_repeats(logits, recent, params.repetition_penalty)
    if params.greedy:
        return mx.argmax(logits)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = mx.min(mx.topk(logits, min(params.top_k, logits.shape[-1])))
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits)  # descending
        probs = mx.softmax(logits[order], axis=-1)
        drop = mx.cumsum(probs) - probs >= params.top_p  # keep the first token always
        logits = mx.where(drop[mx.argsort(order)], -mx.inf, logits)
    return mx.random.categorical(logits, key=rng.next())
