"""Preallocated KV cache: one buffer per layer, sized by the caller, written in place.

Two options change what a layer's buffer holds, never what attention computes from it:

- int8 (kv_bits=8): each head's K and V vector of a token is stored as int8 with one float16
  scale (symmetric absmax over head_dim), and dequantized to the compute dtype one layer at a time
  inside attention, so the transient is one layer's K/V, never the whole cache.
- a ring (sliding-window models): a cache with fewer slots than its context keeps position p in
  slot p % slots. Attention then sees every slot with its position (a window mask drops what is
  out of reach), and a chunk of queries fits as long as slots >= window + chunk - 1
  (arbor_core.planner.kv_cache_tokens), so memory is bounded by the window, not the context.
  The ring's rules are arbor_core.kv_layout's; this module only moves tensors.
"""

from __future__ import annotations

import torch

from arbor_core import kv_layout
from arbor_core.rope import RopeTables

INT8_MAX = 127
SCALE_DTYPE = torch.float16
TINY_SCALE = 1e-30  # an all-zero vector gets scale 0; dividing by this keeps its codes at 0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, D) -> int8 codes (…, D) and float16 scales (…, 1): x ≈ codes * scale, |error| <= scale / 2."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / INT8_MAX).to(SCALE_DTYPE)
    # quantize with the stored (float16-rounded) scale, so dequantizing uses exactly the scale the codes assume
    codes = torch.round(x.float() / scale.float().clamp_min(TINY_SCALE)).clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype).mul_(scale.to(dtype))  # in place: one layer's K (or V) in `dtype` is the whole transient


class KVCache:
    """Keys and values of one layer in `slots` slots. (B, n_kv_heads, slots, head_dim)."""

    def __init__(self, slots: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device, bits: int = 16,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        shape = (1, n_kv_heads, slots, head_dim)
        self.slots, self.dtype, self.bits = slots, dtype, bits
        store = torch.int8 if bits == 8 else dtype
        # k, v: given when the buffers are views of the whole model's stacked cache (ModelCache)
        self.k = torch.zeros(shape, dtype=store, device=device) if k is None else k
        self.v = torch.zeros(shape, dtype=store, device=device) if v is None else v
        self.k_scale = self.v_scale = None
        if bits == 8:
            self.k_scale = torch.zeros(shape[:3] + (1,), dtype=SCALE_DTYPE, device=device)
            self.v_scale = torch.zeros(shape[:3] + (1,), dtype=SCALE_DTYPE, device=device)
        # the ring's bookkeeping: positions [oldest, end of the latest write) are all held
        self.oldest = 0

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write positions [start, start+T); return (keys, values, positions) for attention.

        positions is None when the keys are positions [0, start+T) in order; otherwise the
        (slots,) absolute position each slot holds (the ring has wrapped).
        """
        T = k.shape[2]
        end = start + T
        for a, b, i, j in kv_layout.write_spans(start, T, self.slots):  # two spans when the write wraps
            self._write(a, b, k[:, :, i:j], v[:, :, i:j])
        self.oldest = kv_layout.oldest_held(self.oldest, end, self.slots)
        if end <= self.slots:
            return self._read(end) + (None,)
        slot = torch.arange(self.slots, device=self.k.device)
        return self._read(self.slots) + (kv_layout.slot_positions(slot, end, self.slots),)

    def _write(self, a: int, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.bits == 8:
            (self.k[:, :, a:b], self.k_scale[:, :, a:b]), (self.v[:, :, a:b], self.v_scale[:, :, a:b]) = (
                quantize_int8(k), quantize_int8(v))
        else:
            self.k[:, :, a:b] = k
            self.v[:, :, a:b] = v

    def _read(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 8:
            return (dequantize_int8(self.k[:, :, :n], self.k_scale[:, :, :n], self.dtype),
                    dequantize_int8(self.v[:, :, :n], self.v_scale[:, :, :n], self.dtype))
        return self.k[:, :, :n], self.v[:, :, :n]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)


class ModelCache:
    """The whole model's cache plus how many positions hold valid entries.

    `capacity` is the context (positions it accepts); `slots` what each layer stores: equal to the
    capacity, or fewer for a sliding-window model (a ring, see KVCache). `max_chunk` is the most
    tokens one forward may write so that every query still sees its whole window. `rope` is the
    RoPE the cache is built for (None: whatever tables the model has when it runs).
    """

    def __init__(self, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 bits: int = 16, window: int | None | list = None, slots: int | None | list = None,
                 rope: RopeTables | None = None, stacked: tuple[torch.Tensor, torch.Tensor] | None = None):
        # window, slots: one for every layer, or one per layer (a Gemma's windowed layers keep a ring, its global
        # layers the whole context); stacked: the two buffers, given by a CachePool whose row this cache is
        self.capacity = capacity
        self.windows = kv_layout.per_layer(window, n_layers)
        self.rope = rope
        self.layer_slots = [kv_layout.cache_slots(capacity, s) for s in kv_layout.per_layer(slots, n_layers)]
        self.slots = min(self.layer_slots)  # the fewest any layer holds: = capacity when no layer is a ring
        self.max_chunk = kv_layout.layers_max_chunk(capacity, self.layer_slots, self.windows)
        self.length = 0
        self.decoder = None  # the CUDA-graph decode step bound to these buffers, built on first decode
        self.pool: CachePool | None = None  # the pool whose row `row` this cache is (CachePool), if any
        self.row = 0
        # A 16-bit cache is two stacked buffers, (layers, kv_heads, slots, head_dim), each layer's a view:
        # the compiled CPU decode step (compiled_decode.py) takes the whole cache as two inputs.
        self.stacked_k = self.stacked_v = None
        if bits == 16 and len(set(self.layer_slots)) == 1:
            shape = (n_layers, n_kv_heads, self.slots, head_dim)
            # Attention reads only written slots, except a ring's, which reads every slot under a mask (and an
            # uninitialised NaN times a zero weight is NaN): only a ring needs zeros (GPUs keep them too).
            # Left uninitialised, a CPU cache's pages become resident as positions are written, so a short
            # chat in a long context holds what it uses (docs/performance.md, "Resident memory").
            ring = self.slots < capacity or any(w is not None for w in self.windows)
            make = torch.empty if torch.device(device).type == "cpu" and not ring else torch.zeros
            self.stacked_k, self.stacked_v = stacked or (make(shape, dtype=dtype, device=device),
                                                         make(shape, dtype=dtype, device=device))
            self.layers = [KVCache(self.slots, n_kv_heads, head_dim, dtype, device, bits,
                                   k=self.stacked_k[i:i + 1], v=self.stacked_v[i:i + 1]) for i in range(n_layers)]
        else:
            self.layers = [KVCache(s, n_kv_heads, head_dim, dtype, device, bits) for s in self.layer_slots]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (entries past it are overwritten by the next write).

        A ring may have overwritten keys that a query at `length` still needs (its window reaches
        back before the oldest position held): then nothing is kept, length becomes 0, and callers
        (chat's prefix reuse) see from `length` that they must prefill again from the start.
        """
        length = kv_layout.layers_kept_length(length, self.length, self.windows, [c.oldest for c in self.layers])
        if length == 0:
            for layer in self.layers:
                layer.oldest = 0
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


class CachePool:
    """`n` ModelCaches of one context in one pair of buffers, (n, layers, kv_heads, capacity, head_dim): each
    cache's stacked buffers are its row, so it prefills and decodes alone as any cache does, while a batched
    decode step reads every row's keys in one attention call over the rows, each masked to its own length
    (model.Rows). 16-bit caches without a ring only.

    That call reads each row up to the longest row's length, and a masked key still multiplies its value by a
    zero weight: a CPU row's unwritten (uninitialised) positions are made finite first (make_finite), up to
    what each step reads, so the pool's pages stay lazily resident as a single cache's do."""

    def __init__(self, n: int, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device, rope: RopeTables | None = None):
        cpu = torch.device(device).type == "cpu"
        make = torch.empty if cpu else torch.zeros
        shape = (n, n_layers, n_kv_heads, capacity, head_dim)
        self.k, self.v = make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device)
        self.finite = [0 if cpu else capacity] * n  # row r's positions [0, finite[r]) hold finite numbers
        self.caches = [ModelCache(capacity, n_layers, n_kv_heads, head_dim, dtype, device, rope=rope,
                                  stacked=(self.k[i], self.v[i])) for i in range(n)]
        for i, cache in enumerate(self.caches):
            cache.pool, cache.row = self, i

    def make_finite(self, rows: range, end: int) -> None:
        """Positions [0, end) of every row in `rows` finite: what a row's cache has written is; the rest is zeroed."""
        for r in rows:
            begin = max(self.finite[r], min(self.caches[r].length, end))
            if begin < end:
                self.k[r, :, :, begin:end] = 0
                self.v[r, :, :, begin:end] = 0
            self.finite[r] = max(self.finite[r], end)
