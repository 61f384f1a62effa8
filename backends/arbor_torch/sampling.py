"""Picking the next token on the device: repetition penalty, temperature, top-k, top-p (torch)."""

from __future__ import annotations

import numpy as np
import torch

from arbor_core.backend import SamplingParams, allowed_over


def new_rng(device: str, seed: int | None) -> torch.Generator:
    """A generator on `device`: seeded, the same seed draws the same tokens; None, a fresh random one."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng


def penalise_repeats(logits: torch.Tensor, recent, penalty: float) -> torch.Tensor:
    """HF / llama.cpp's repetition penalty: the scores of `recent` tokens divided by `penalty` when
    positive, multiplied when negative. A new tensor: the caller's logits are untouched."""
    seen = torch.tensor(sorted(set(recent)), device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def keep_allowed(logits: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """`logits` with every token outside `allowed` (bool [n]; ids >= n are outside) at -inf."""
    keep = torch.from_numpy(allowed_over(allowed, logits.shape[-1]))
    return logits.masked_fill(~keep.to(logits.device, non_blocking=True), float("-inf"))


@torch.inference_mode()
def sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None, recent=(),
           allowed: np.ndarray | None = None) -> int:
    """The next token from (vocab,) logits; with `allowed`, one of those tokens (a schema's mask)."""
    if allowed is not None:
        logits = keep_allowed(logits, allowed)
    if params.repetition_penalty != 1.0 and len(recent):
        logits = penalise_repeats(logits, recent, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first token always
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))
