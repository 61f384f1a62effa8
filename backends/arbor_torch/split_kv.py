"""Split-KV ("flash-decoding") attention for one query token over a long KV cache, in Triton.

Decode attends one query per head to every cached key. SDPA's kernels parallelise over query
blocks, so with one query they run a handful of thread blocks and leave the GPU idle; here the
cache is cut into splits, each thread block computes a partial softmax over its split for all
the query heads that share one KV head (GQA), and a second kernel merges the partials with
their log-sum-exp weights. The number of valid keys is read from a device tensor, so one CUDA
graph serves every position: splits past the end return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64
TARGET_PROGRAMS_PER_SM = 2


@triton.jit
def _partial_attention(Q, K, V, Length, O_part, M_part, L_part, scale,
                       stride_kh, stride_kn,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(Length)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (kv_head * G + offs_g)[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)
    for n0 in range(start, end, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        valid = offs_n < end
        kv_offsets = kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + kv_offsets, mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offsets, mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    part = (kv_head * NUM_SPLITS + split) * G_PAD
    tl.store(O_part + (part + offs_g)[:, None] * D + offs_d[None, :], acc)
    tl.store(M_part + part + offs_g, m)
    tl.store(L_part + part + offs_g, l)


@triton.jit
def _merge_partials(O_part, M_part, L_part, Out, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    head = tl.program_id(0)
    kv_head = head // G
    g = head % G
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D)
    rows = (kv_head * NUM_SPLITS + offs_s) * G_PAD + g
    in_range = offs_s < NUM_SPLITS
    m = tl.load(M_part + rows, mask=in_range, other=float("-inf"))
    l = tl.load(L_part + rows, mask=in_range, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    acc = tl.load(O_part + rows[:, None] * D + offs_d[None, :], mask=in_range[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(Out + head * D + offs_d, out.to(Out.dtype.element_ty))


class SplitKVAttention:
    """Workspace and launch shapes for one cache capacity; call with (q, k_cache, v_cache, length)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, capacity: int, device, dtype: torch.dtype):
        self.n_heads, self.n_kv, self.d = n_heads, n_kv_heads, head_dim
        self.g = n_heads // n_kv_heads
        self.g_pad = max(16, triton.next_power_of_2(self.g))  # tl.dot needs 16 rows
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        blocks = math.ceil(capacity / BLOCK_N)
        self.num_splits = max(1, min(blocks, math.ceil(TARGET_PROGRAMS_PER_SM * sms / n_kv_heads)))
        self.split = math.ceil(blocks / self.num_splits) * BLOCK_N
        self.num_splits = math.ceil(capacity / self.split)
        shape = (n_kv_heads * self.num_splits * self.g_pad,)
        self.o_part = torch.empty(shape + (head_dim,), device=device, dtype=torch.float32)
        self.m_part = torch.empty(shape, device=device, dtype=torch.float32)
        self.l_part = torch.empty(shape, device=device, dtype=torch.float32)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.ieee = dtype == torch.float32

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        # q: (n_heads, D) contiguous; k/v_cache: (1, n_kv, capacity, D); length: int32 (1,) valid keys
        out = torch.empty_like(q) if out is None else out
        _partial_attention[(self.n_kv, self.num_splits)](
            q, k_cache, v_cache, length, self.o_part, self.m_part, self.l_part, self.scale,
            k_cache.stride(1), k_cache.stride(2),
            G=self.g, G_PAD=self.g_pad, D=self.d, BLOCK=BLOCK_N, SPLIT=self.split, NUM_SPLITS=self.num_splits,
            IEEE=self.ieee, num_warps=4)
        _merge_partials[(self.n_heads,)](
            self.o_part, self.m_part, self.l_part, out, G=self.g, G_PAD=self.g_pad, D=self.d,
            NUM_SPLITS=self.num_splits, SPLITS_PAD=triton.next_power_of_2(self.num_splits), num_warps=4)
        return out
