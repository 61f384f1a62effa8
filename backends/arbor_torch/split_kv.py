"""Split-KV ("flash-decoding") attention for one query token over a long KV cache, in Triton.

Decode attends one query per head to every cached key. SDPA's kernels parallelise over query
blocks, so with one query they run a handful of thread blocks and leave the GPU idle; here the
cache is cut into splits, each thread block computes a partial softmax over its split for all
the query heads that share one KV head (GQA), and a second kernel merges the partials with
their log-sum-exp weights. The number of valid keys is read from a device tensor, so one CUDA
graph serves every position: splits past the end return at once.

The same kernel reads the caches cache.py keeps, whatever their layout:
- int8 (kv_bits 8): codes and one float16 scale per head and token, dequantized in registers as
  the keys are loaded, so the cache's half-sized bytes are all that crosses memory; the product is
  rounded to the compute dtype exactly as the eager path's dequantize_int8 rounds it;
- a ring (a sliding-window layer, arbor_core.kv_layout): slot s holds the latest position p with
  p % slots == s, and keys older than the window are masked by their position.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64
ROW_BYTES_FOR_FULL_BLOCK = 512  # keys of head_dim x element size above this get 16-key blocks (shared memory)
TARGET_PROGRAMS_PER_SM = 2


@triton.jit
def _partial_attention(Q, K, V, K_scale, V_scale, Length, O_part, M_part, L_part, scale,
                       stride_kh, stride_kn, stride_sh, slots, window,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
                       QUANT: tl.constexpr, WINDOWED: tl.constexpr):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(Length)  # positions written, the query's own included: the query is at length - 1
    held = tl.minimum(length, slots)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (kv_head * G + offs_g)[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, held)
    for n0 in range(start, end, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        valid = offs_n < end
        if WINDOWED:  # the position slot n holds (a ring's, or n itself) must be within the window
            position = offs_n + slots * ((length - 1 - offs_n) // slots)
            valid = valid & (position > length - 1 - window)
        kv_offsets = kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + kv_offsets, mask=valid[:, None], other=0)
        if QUANT:  # codes x scale, the scale first rounded to the compute dtype (as dequantize_int8 does)
            k_scale = tl.load(K_scale + kv_head * stride_sh + offs_n, mask=valid, other=0.0)
            k_scale = k_scale.to(Q.dtype.element_ty).to(tl.float32)
            k = (k.to(tl.float32) * k_scale[:, None]).to(Q.dtype.element_ty)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block the window hid entirely adds nothing
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offsets, mask=valid[:, None], other=0)
        if QUANT:
            v_scale = tl.load(V_scale + kv_head * stride_sh + offs_n, mask=valid, other=0.0)
            v_scale = v_scale.to(Q.dtype.element_ty).to(tl.float32)
            v = (v.to(tl.float32) * v_scale[:, None]).to(Q.dtype.element_ty)
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


def multiprocessors(device) -> int:
    if torch.device(device).type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


class SplitKVAttention:
    """Workspace and launch shapes for one layer layout; call with (q, k_cache, v_cache, length[, scales]).

    slots: the cache's entries per layer (its capacity, or a ring's size); window: the layer's sliding
    window (None: global attention); scale: the softmax scale (None: head_dim ** -0.5); quantized: the
    cache holds int8 codes and float16 scales (cache.py's kv_bits 8).
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, slots: int, device, dtype: torch.dtype,
                 window: int | None = None, scale: float | None = None, quantized: bool = False):
        self.n_heads, self.n_kv, self.d = n_heads, n_kv_heads, head_dim
        self.g = n_heads // n_kv_heads
        self.g_pad = max(16, triton.next_power_of_2(self.g))  # tl.dot needs 16 rows
        self.slots, self.window, self.quantized = slots, window, quantized
        # float32 keys of Gemma's 256 dimensions in 64-key blocks ask an H200 for 276 KiB of shared memory
        self.block = BLOCK_N if head_dim * dtype.itemsize <= ROW_BYTES_FOR_FULL_BLOCK else 16
        blocks = math.ceil(slots / self.block)
        self.num_splits = max(1, min(blocks, math.ceil(TARGET_PROGRAMS_PER_SM * multiprocessors(device) / n_kv_heads)))
        self.split = math.ceil(blocks / self.num_splits) * self.block
        self.num_splits = math.ceil(slots / self.split)
        shape = (n_kv_heads * self.num_splits * self.g_pad,)
        self.o_part = torch.empty(shape + (head_dim,), device=device, dtype=torch.float32)
        self.m_part = torch.empty(shape, device=device, dtype=torch.float32)
        self.l_part = torch.empty(shape, device=device, dtype=torch.float32)
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.ieee = dtype == torch.float32

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                 out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
        # q: (n_heads, D) contiguous; k/v_cache: (1, n_kv, slots, D), int8 when quantized, with k/v_scale
        # (1, n_kv, slots, 1); length: int32 (1,), positions written so far (the query's own included)
        out = torch.empty_like(q) if out is None else out
        if self.quantized != (k_scale is not None):
            raise ValueError("an int8 cache is read with its scales, a 16-bit one without")
        scales = (k_scale, v_scale) if self.quantized else (k_cache, v_cache)  # unread when not quantized
        _partial_attention[(self.n_kv, self.num_splits)](
            q, k_cache, v_cache, scales[0], scales[1], length, self.o_part, self.m_part, self.l_part, self.scale,
            k_cache.stride(1), k_cache.stride(2), scales[0].stride(1), self.slots, self.window or 0,
            G=self.g, G_PAD=self.g_pad, D=self.d, BLOCK=self.block, SPLIT=self.split, NUM_SPLITS=self.num_splits,
            IEEE=self.ieee, QUANT=self.quantized, WINDOWED=self.window is not None, num_warps=4)
        _merge_partials[(self.n_heads,)](
            self.o_part, self.m_part, self.l_part, out, G=self.g, G_PAD=self.g_pad, D=self.d,
            NUM_SPLITS=self.num_splits, SPLITS_PAD=triton.next_power_of_2(self.num_splits), num_warps=4)
        return out
