"""KV cache: one buffer per layer, preallocated in steps of STEP positions up to its slots.

MLX arrays are written in place at [start, end) (as mlx-lm's KVCache does); a buffer grows by
whole steps only when a write reaches past its end, so a 128K-token context costs memory as the
conversation reaches it rather than up front, and growing happens every STEP tokens, not each one.

The same two options as arbor_torch/cache.py, with the same arithmetic (arbor_core.kv_layout):
- int8 (kv_bits=8): int8 codes plus one float16 scale per head and token (symmetric absmax over
  head_dim), dequantized to the compute dtype one layer at a time inside attention.
- a ring (sliding-window models): fewer slots than the context, position p in slot p % slots;
  once it wraps, attention sees every slot with its position and a window mask.
"""

from __future__ import annotations

import mlx.core as mx

from arbor_core import kv_layout
from arbor_core.rope import RopeTables

STEP = 256
INT8_MAX = 127
SCALE_DTYPE = mx.float16
TINY_SCALE = 1e-30  # an all-zero vector gets scale 0; dividing by this keeps its codes at 0


def quantize_int8(x: mx.array) -> tuple[mx.array, mx.array]:
    """(…, D) -> int8 codes (…, D) and float16 scales (…, 1): x ≈ codes * scale, |error| <= scale / 2."""
    amax = mx.max(mx.abs(x.astype(mx.float32)), axis=-1, keepdims=True)
    scale = (amax / INT8_MAX).astype(SCALE_DTYPE)
    # quantize with the stored (float16-rounded) scale, so dequantizing uses exactly the scale the codes assume
    codes = mx.clip(mx.round(x.astype(mx.float32) / mx.maximum(scale.astype(mx.float32), TINY_SCALE)),
                    -INT8_MAX, INT8_MAX)
    return codes.astype(mx.int8), scale


def dequantize_int8(codes: mx.array, scale: mx.array, dtype: mx.Dtype) -> mx.array:
    return codes.astype(dtype) * scale.astype(dtype)


class KVCache:
    """Keys and values of one layer in up to `slots` slots. (B, n_kv_heads, allocated, head_dim)."""

    def __init__(self, slots: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype, bits: int = 16):
        self.slots = self.capacity = slots
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.dtype, self.bits = dtype, bits
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.key_scales: mx.array | None = None  # int8 only
        self.value_scales: mx.array | None = None
        self.oldest = 0  # the ring's bookkeeping: positions [oldest, end of the latest write) are all held

    @property
    def allocated(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, start: int, k: mx.array, v: mx.array):
        """Write positions [start, start+T); return (keys, values, positions) for attention.

        positions is None when the keys are positions [0, start+T) in order; otherwise the
        (slots,) absolute position each slot holds (the ring has wrapped).
        """
        T = k.shape[2]
        end = start + T
        if min(end, self.slots) > self.allocated:
            self._grow(min(self.slots, -(-end // STEP) * STEP))
        for a, b, i, j in kv_layout.write_spans(start, T, self.slots):  # two spans when the write wraps
            self._write(a, b, k[:, :, i:j], v[:, :, i:j])
        self.oldest = kv_layout.oldest_held(self.oldest, end, self.slots)
        if end <= self.slots:
            return self._read(end) + (None,)
        return self._read(self.slots) + (kv_layout.slot_positions(mx.arange(self.slots), end, self.slots),)

    def _write(self, a: int, b: int, k: mx.array, v: mx.array) -> None:
        if self.bits == 8:
            (self.keys[:, :, a:b, :], self.key_scales[:, :, a:b, :]) = quantize_int8(k)
            (self.values[:, :, a:b, :], self.value_scales[:, :, a:b, :]) = quantize_int8(v)
        else:
            self.keys[:, :, a:b, :] = k
            self.values[:, :, a:b, :] = v

    def _read(self, n: int) -> tuple[mx.array, mx.array]:
        if self.bits == 8:
            return (dequantize_int8(self.keys[:, :, :n, :], self.key_scales[:, :, :n, :], self.dtype),
                    dequantize_int8(self.values[:, :, :n, :], self.value_scales[:, :, :n, :], self.dtype))
        return self.keys[:, :, :n, :], self.values[:, :, :n, :]

    def _grow(self, size: int) -> None:
        B, heads, _, dim = self.shape
        store = mx.int8 if self.bits == 8 else self.dtype

        def extend(a: mx.array | None, width: int, dtype: mx.Dtype) -> mx.array:
            extra = mx.zeros((B, heads, size - self.allocated, width), dtype=dtype)
            return extra if a is None else mx.concatenate([a, extra], axis=2)

        if self.bits == 8:  # before the codes: `allocated` is read from the keys
            self.key_scales = extend(self.key_scales, 1, SCALE_DTYPE)
            self.value_scales = extend(self.value_scales, 1, SCALE_DTYPE)
        self.keys, self.values = extend(self.keys, dim, store), extend(self.values, dim, store)

    def arrays(self) -> list[mx.array]:
        held = [self.keys, self.values, self.key_scales, self.value_scales]
        return [a for a in held if a is not None]


class ModelCache:
    """The whole model's cache plus how many positions hold valid entries.

    `capacity` is the context (positions it accepts); `slots` what each layer stores at most: the
    capacity, or fewer for a sliding-window model (a ring). `max_chunk` is the most tokens one
    forward may write so that every query still sees its whole window. `rope` is the RoPE the
    cache is built for (None: whatever the model has set when it runs).
    """

    def __init__(self, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype,
                 bits: int = 16, window: int | None | list = None, slots: int | None | list = None,
                 rope: RopeTables | None = None, layers: list | None = None):
        # window, slots: one for every layer, or one per layer (a Gemma's windowed layers keep a ring, its global
        # layers the whole context)
        self.capacity = capacity
        self.windows = kv_layout.per_layer(window, n_layers)
        self.rope = rope
        self.layer_slots = [kv_layout.cache_slots(capacity, s) for s in kv_layout.per_layer(slots, n_layers)]
        self.slots = min(self.layer_slots)  # the fewest any layer holds: = capacity when no layer is a ring
        self.max_chunk = kv_layout.layers_max_chunk(capacity, self.layer_slots, self.windows)
        self.length = 0
        # layers: given by a CachePool (each a RowKV, this cache's row of the pool's layer)
        self.layers = layers or [KVCache(s, n_kv_heads, head_dim, dtype, bits) for s in self.layer_slots]
        self.pool: CachePool | None = None  # the pool whose row `row` this cache is, if any
        self.row = 0
        # the decode step MLXModel.sample queued for position `length`: (position, token, logits), or None
        self.pending: tuple[int, mx.array, mx.array] | None = None

    def truncate(self, length: int) -> None:
        """Forget positions >= length (entries past it are overwritten by the next write).

        A ring may have overwritten keys that a query at `length` still needs: then nothing is
        kept and length becomes 0 (callers read `length` to see how much they may reuse).
        """
        length = kv_layout.layers_kept_length(length, self.length, self.windows, [c.oldest for c in self.layers])
        if length == 0:
            for layer in self.layers:
                layer.oldest = 0
        self.length = length
        self.pending = None

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers for a in layer.arrays()]

    @property
    def nbytes(self) -> int:
        """Bytes allocated so far (the buffers grow towards `slots` in steps)."""
        return sum(a.nbytes for a in self.arrays())


class PoolLayer:
    """One layer of a CachePool: keys and values (n, kv_heads, allocated, head_dim), every row grown together in
    steps of STEP positions up to `slots`."""

    def __init__(self, n: int, slots: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.n, self.slots, self.shape, self.dtype = n, slots, (n, n_kv_heads, 0, head_dim), dtype
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def allocated(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reach(self, end: int) -> None:
        """Room for positions [0, end) in every row."""
        if min(end, self.slots) > self.allocated:
            n, heads, _, dim = self.shape
            shape = (n, heads, min(self.slots, -(-end // STEP) * STEP) - self.allocated, dim)
            # two arrays: written in place, keys and values must not be one object
            extra_k, extra_v = mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=self.dtype)
            self.keys = extra_k if self.keys is None else mx.concatenate([self.keys, extra_k], axis=2)
            self.values = extra_v if self.values is None else mx.concatenate([self.values, extra_v], axis=2)


class RowKV:
    """A KVCache (16-bit, no ring) that is row `row` of a PoolLayer: what one sequence's cache does alone (prefill,
    decode, export), written into and read from the pool's arrays."""

    bits = 16
    oldest = 0
    key_scales = value_scales = None

    def __init__(self, pool: PoolLayer, row: int):
        self.pool, self.row = pool, row
        self.slots = self.capacity = pool.slots
        self.dtype = pool.dtype

    @property
    def allocated(self) -> int:
        return self.pool.allocated

    @property
    def keys(self) -> mx.array | None:
        return None if self.pool.keys is None else self.pool.keys[self.row:self.row + 1]

    @property
    def values(self) -> mx.array | None:
        return None if self.pool.values is None else self.pool.values[self.row:self.row + 1]

    def update(self, start: int, k: mx.array, v: mx.array):
        end = start + k.shape[2]
        self.pool.reach(end)
        self.pool.keys[self.row:self.row + 1, :, start:end, :] = k
        self.pool.values[self.row:self.row + 1, :, start:end, :] = v
        return self.pool.keys[self.row:self.row + 1, :, :end, :], self.pool.values[self.row:self.row + 1, :, :end, :], None

    def _grow(self, size: int) -> None:
        self.pool.reach(size)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.pool.keys, self.pool.values) if a is not None]


class CachePool:
    """`n` ModelCaches of one context (16-bit, no ring) whose layers are rows of one pair of arrays per layer:
    each cache prefills and decodes alone as any cache does, while a batched step writes its one-token rows'
    keys and values with one scatter and attends them in one call per layer (layers.Rows)."""

    def __init__(self, n: int, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype,
                 rope: RopeTables | None = None):
        self.layers = [PoolLayer(n, capacity, n_kv_heads, head_dim, dtype) for _ in range(n_layers)]
        self.caches = [ModelCache(capacity, n_layers, n_kv_heads, head_dim, dtype, rope=rope,
                                  layers=[RowKV(layer, i) for layer in self.layers]) for i in range(n)]
        for i, cache in enumerate(self.caches):
            cache.pool, cache.row = self, i
