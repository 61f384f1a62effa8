"""The MLX layers every architecture in arch/ is built of: RMSNorm, RoPE, grouped-query attention, the gated MLP.

Written with MLX's fused kernels (`mx.fast.rms_norm`, `mx.fast.rope`, `mx.fast.scaled_dot_product_attention`).
Module and parameter names follow Hugging Face's, so an architecture's layer built from these maps straight
onto the checkpoint's tensor names (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, …).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from arbor_core import kv_layout
from arbor_core.config import ArborConfig

from .cache import KVCache


class RMSNorm(nn.Module):
    """x / rms(x) * weight; Gemma stores the weight as an offset from 1 (`offset`)."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = mx.zeros((dim,)) if offset else mx.ones((dim,))
        self.eps, self.offset = eps, offset

    def __call__(self, x: mx.array) -> mx.array:
        if self.offset:  # x * (1 + w), the factor formed in float32 as transformers does
            return mx.fast.rms_norm(x, (1.0 + self.weight.astype(mx.float32)).astype(x.dtype), self.eps)
        return mx.fast.rms_norm(x, self.weight, self.eps)  # accumulates in float32 whatever x's dtype


class Rope:
    """RoPE with arbor's frequencies (rope.py): HF's half-split layout, scaled by attention_factor.

    arbor hands every backend inverse frequencies; `mx.fast.rope` takes the reciprocal (a
    wavelength-like `freqs`, angle = position / freqs), which expresses linear, dynamic, yarn and
    llama3 scaling alike. YaRN's attention factor multiplies cos and sin, i.e. the rotated vector. With a
    partial_rotary_factor < 1 only the first `dims` of a head rotate (and scale); the rest pass through.
    """

    def __init__(self, inv_freq: np.ndarray, attention_factor: float, positions: int):
        self.freqs = mx.array(np.float32(1.0) / inv_freq.astype(np.float32))
        self.dims = 2 * inv_freq.shape[0]
        self.attention_factor = attention_factor
        self.positions = positions  # the context it was set up for: positions beyond are refused

    def __call__(self, x: mx.array, start: int) -> mx.array:
        # x: (B, heads, T, head_dim) at positions [start, start + T)
        x = mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=start, freqs=self.freqs)
        if self.attention_factor == 1.0:
            return x
        if self.dims == x.shape[-1]:
            return x * self.attention_factor
        return mx.concatenate([x[..., :self.dims] * self.attention_factor, x[..., self.dims:]], axis=-1)


class Rows:
    """Several sequences packed into one forward's T positions (B = 1): sequence i's tokens are the packed
    positions [offsets[i], offsets[i + 1]), running at [starts[i], starts[i] + counts[i]) of its own cache
    (a ModelCache). Projections and MLP see one (1, T, hidden) array. When every row is one token (a decode
    step), RoPE is one call with each row's position, and rows whose caches are rows of one CachePool attend
    in one call (PooledRows); otherwise RoPE and attention run per sequence."""

    def __init__(self, caches: list, counts: list[int]):
        self.caches, self.counts = caches, counts
        self.starts = [c.length for c in caches]
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)
        self.spans = list(zip(self.offsets, self.offsets[1:]))
        self.single = all(n == 1 for n in counts)
        self.start_array = mx.array(self.starts) if self.single else None
        pool = caches[0].pool
        self.pooled = PooledRows(pool, caches) if self.single and pool is not None and all(
            c.pool is pool for c in caches) else None

    def layer(self, i: int) -> "LayerRows":
        return LayerRows([(span, c.layers[i], s) for span, c, s in zip(self.spans, self.caches, self.starts)], i,
                         self.pooled)

    def rope(self, rope: "Rope") -> "RowsRope":
        return RowsRope(rope, self)


class PooledRows:
    """A decode step's rows (one token each) over one CachePool: new keys and values scattered into the pool's
    layer at each row's position, then the pool's rows [lo, hi) attended at once up to `end` positions, each
    masked to its own (rows between them that take no part see position 0 only; their output is dropped)."""

    def __init__(self, pool, caches: list):
        self.pool = pool
        rows, lengths = [c.row for c in caches], [c.length for c in caches]
        self.lo, self.hi, self.end = min(rows), max(rows) + 1, max(lengths) + 1
        self.rows, self.lengths = mx.array(rows), mx.array(lengths)
        self.local = self.rows - self.lo
        seen = [0] * (self.hi - self.lo)
        for r, n in zip(rows, lengths):
            seen[r - self.lo] = n
        self.mask = (mx.arange(self.end)[None, :] <= mx.array(seen)[:, None])[:, None, None, :]  # (R, 1, 1, end)


class LayerRows(list):
    """One layer's view of Rows: ((begin, end) in the packed positions, the sequence's KVCache, its start);
    `pooled` (with the layer's `index`): the rows attending in one call over their pool."""

    def __init__(self, rows: list, index: int = 0, pooled: PooledRows | None = None):
        super().__init__(rows)
        self.index, self.pooled = index, pooled


class RowsRope:
    """A Rope over packed rows: each sequence's slice rotated from its own start (the `start` given is unused),
    so an architecture's pre_attention runs packed rows unchanged; one-token rows in one call."""

    def __init__(self, rope: "Rope", rows: Rows):
        self.inner, self.rows = rope, rows

    def __call__(self, x: mx.array, start: int) -> mx.array:
        if self.rows.single:  # (1, heads, B, D) -> (B, heads, 1, D): a row per batch entry, each at its position
            return self.inner(x.transpose(2, 1, 0, 3), self.rows.start_array).transpose(2, 1, 0, 3)
        return mx.concatenate([self.inner(x[:, :, a:b], s) for (a, b), s in zip(self.rows.spans, self.rows.starts)],
                              axis=2)


class Attention(nn.Module):
    """The q/k/v/o projections of one layer and attention over its KV cache; what comes before and after
    (norms, RoPE) is the architecture's."""

    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)
        self.scale = cfg.attention_scale  # head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping  # Gemma 2: scores soft-capped before the softmax
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(B, T, hidden) -> q (B, n_heads, T, head_dim), k and v (B, n_kv_heads, T, head_dim)."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | LayerRows | None, start: int) -> mx.array:
        """Queries at [start, start + T) over the cached keys and these: (B, T, n_heads * head_dim), before o_proj.
        With `cache` a LayerRows (sequences packed into T), each sequence attends over its own cache."""
        if isinstance(cache, LayerRows):
            if cache.pooled is not None and self.window is None and self.softcap is None:
                return self._attend_pooled(q, k, v, cache.pooled, cache.index)
            return mx.concatenate([self.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], layer, row_start)
                                   for (a, b), layer, row_start in cache], axis=1)
        B, _, T, _ = q.shape
        key_pos = None  # None: the keys are positions [0, start + T) in order
        if cache is not None:
            k, v, key_pos = cache.update(start, k, v)  # key_pos: each key's position, once a ring cache wrapped
        key_start = 0
        if key_pos is None and self.window is not None and start + T > self.window:
            key_start = kv_layout.first_visible_key(start, self.window)  # older keys are outside every query's window
            k, v = k[:, :, key_start:], v[:, :, key_start:]
        mask = attention_mask(T, k.shape[2], key_start, start, self.window, key_pos)
        if self.softcap is None:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # GQA: k/v not tiled
        else:
            if isinstance(mask, str):  # "causal": the keys end with the queries
                mask = kv_layout.visible(mx.arange(start, start + T), mx.arange(key_start, start + T), None)
            y = capped_attention(q, k, v, mask, self.scale, self.softcap)
        return y.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * self.head_dim)


    def _attend_pooled(self, q: mx.array, k: mx.array, v: mx.array, p: PooledRows, index: int) -> mx.array:
        """One token a row over the pool's layer `index`: (1, B, n_heads * head_dim)."""
        layer = p.pool.layers[index]
        layer.reach(p.end)
        layer.keys[p.rows, :, p.lengths] = k[0].transpose(1, 0, 2)  # (B, kv_heads, D) at each row's position
        layer.values[p.rows, :, p.lengths] = v[0].transpose(1, 0, 2)
        B = q.shape[2]
        queries = mx.zeros((p.hi - p.lo, self.n_heads, 1, self.head_dim), dtype=q.dtype)
        queries[p.local] = q[0].transpose(1, 0, 2)[:, :, None]  # (B, heads, 1, D)
        y = mx.fast.scaled_dot_product_attention(queries, layer.keys[p.lo:p.hi, :, :p.end],
                                                 layer.values[p.lo:p.hi, :, :p.end], scale=self.scale, mask=p.mask)
        return y[p.local].reshape(1, B, self.n_heads * self.head_dim)


def attention_mask(q_len: int, kv_len: int, key_start: int, start: int, window: int | None, key_pos=None):
    """Mask for queries at [start, start+q_len) over keys at [key_start, key_start+kv_len), or at
    the positions `key_pos` (a wrapped ring cache's slots, which only a window model has).

    None for one query whose keys are all visible; "causal" (MLX aligns it lower-right: the last
    query sees the last key) when the keys end with the queries and no window cuts in; otherwise
    an explicit boolean matrix, as arbor_torch's `_mask` builds it.
    """
    end = key_start + kv_len
    windowed = kv_layout.window_cuts_in(window, start + q_len - 1, key_start)  # some query loses a key
    if key_pos is None and not windowed and end == start + q_len:
        return None if q_len == 1 else "causal"
    k_pos = mx.arange(key_start, end) if key_pos is None else key_pos
    return kv_layout.visible(mx.arange(start, start + q_len), k_pos, window)


def capped_attention(q: mx.array, k: mx.array, v: mx.array, mask, scale: float, cap: float) -> mx.array:
    """Attention with soft-capped scores, cap * tanh(q.k * scale / cap), written out as transformers' eager Gemma 2
    attention is (mx.fast's kernel takes no cap). q (B, heads, T, D), k and v (B, kv_heads, L, D), `mask` a
    boolean (T, L) or None (every key visible) -> (B, heads, T, D)."""
    B, n_heads, T, D = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, n_heads // n_kv, T, D)  # query heads j*g.. share kv head j
    scores = (q @ k[:, :, None].swapaxes(-1, -2)) * scale
    scores = mx.tanh(scores / cap) * cap
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    return (weights @ v[:, :, None]).reshape(B, n_heads, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        gate = nn.gelu_approx(gate) if self.gelu else nn.silu(gate)  # GeGLU (tanh GELU) or SwiGLU
        return self.down_proj(gate * self.up_proj(x))
