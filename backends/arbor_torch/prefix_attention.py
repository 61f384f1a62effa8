"""Causal attention for a prefill chunk that follows cached keys, through the fastest square kernels.

A chunk of T queries at positions [P, P+T) attends to keys [0, P+T) with a lower-right causal mask.
SDPA runs that shape only in its memory-efficient kernel (flash and cuDNN align causal masks
top-left), which at 128K tokens is the slowest of the three on Hopper. The same attention splits
exactly into two calls that the fast kernels take as they are:

    queries vs the cached prefix [0, P)   no mask (every cached key is in the past)
    queries vs their own keys [P, P+T)    square, plain causal

Each returns its output and the log-sum-exp of its scores; the softmax over all keys is the
LSE-weighted mix of the two (the merge that flash-decoding and ring attention use). Which kernel
runs was chosen by measurement (choose_kernel says why); ARBOR_PREFILL_ATTENTION overrides it
(cudnn, flash, or efficient = SDPA's lower-right mask, the fallback).
"""

from __future__ import annotations

import math
import os

import torch

from arbor_core.errors import UsageError

KERNELS = ("cudnn", "flash", "efficient")


def choose_kernel(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """flash on Ampere and later, else SDPA's lower-right kernel; cuDNN only when asked for.

    Measured on an H100 at 128K tokens, default model, bf16 (docs/performance.md): cuDNN 1.66 s,
    flash 2.15 s, SDPA's kernel 2.12 s. But on the real model the cuDNN path's logits were 3x
    further from a float32 forward than the others' (4.5% vs 1.6%, flash 1.0%), for a reason not
    found yet (each half and its log-sum-exp match a float64 reference); accuracy comes first, so
    flash is the default and ARBOR_PREFILL_ATTENTION=cudnn opts in. Both fast kernels take only
    half-precision inputs; float32 stays on SDPA's kernel.
    """
    requested = os.environ.get("ARBOR_PREFILL_ATTENTION", "").strip().lower()
    if requested:
        if requested not in KERNELS:
            raise UsageError(f"ARBOR_PREFILL_ATTENTION must be one of {', '.join(KERNELS)}, got {requested!r}")
        return requested
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "efficient"
    major, _ = torch.cuda.get_device_capability(device)
    return "flash" if major >= 8 else "efficient"


def attention_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """q: (B, H, T, D) for the last T positions; k, v: (B, Hkv, P+T, D), P > 0. Returns (B, H, T, D)."""
    prefix = k.shape[2] - q.shape[2]
    out_prefix, lse_prefix = attention_with_lse(q, k[:, :, :prefix], v[:, :, :prefix], causal=False, kernel=kernel)
    out_self, lse_self = attention_with_lse(q, k[:, :, prefix:], v[:, :, prefix:], causal=True, kernel=kernel)
    return merge(out_prefix, lse_prefix, out_self, lse_self).to(q.dtype)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """softmax over keys A ∪ B from the two partial softmaxes: weights exp(lse_x - lse_total)."""
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, T) float32
    w_a, w_b = torch.exp(lse_a - lse).unsqueeze(-1), torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a.float() * w_a + out_b.float() * w_b


def attention_with_lse(q, k, v, causal: bool, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, T, D), log-sum-exp of the scaled scores (B, H, T) in float32)."""
    if kernel == "math" or q.device.type != "cuda":
        return _math(q, k, v, causal)
    k, v = _expand_kv(k, v, q.shape[1])  # the private kernels want as many kv heads as query heads
    if kernel == "cudnn":
        # contiguous inputs: torch caches cuDNN execution plans by shape, and a plan built for other
        # strides (SDPA's own cuDNN call on the first chunk) gave 3x the error of flash on the model
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    elif kernel == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    else:
        raise ValueError(f"no LSE-returning kernel {kernel!r}")
    output, lse = out[0], out[1]
    return output, lse.reshape(output.shape[:3]).float()


def _expand_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = n_heads // k.shape[1]
    if groups == 1:
        return k, v
    # (B, Hkv, S, D) -> (B, Hkv*groups, S, D) as HF's repeat_kv: query head h reads kv head h // groups
    B, Hkv, S, D = k.shape
    return (k[:, :, None].expand(B, Hkv, groups, S, D).reshape(B, Hkv * groups, S, D),
            v[:, :, None].expand(B, Hkv, groups, S, D).reshape(B, Hkv * groups, S, D))


def _math(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: explicit scores in float32 (CPU, tests). Causal here is square, top-left."""
    k, v = _expand_kv(k, v, q.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v.float(), lse
