"""KV cache: one buffer per layer, preallocated in steps of STEP positions up to the capacity.

MLX arrays are written in place at [start, end) (as mlx-lm's KVCache does); a buffer grows by
whole steps only when a write reaches past its end, so a 128K-token context costs memory as the
conversation reaches it rather than up front, and growing happens every STEP tokens, not each one.
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256


class KVCache:
    """Keys and values of one layer for up to `capacity` positions. (B, n_kv_heads, allocated, head_dim)."""

    def __init__(self, capacity: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.capacity = capacity
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.dtype = dtype
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def allocated(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, start: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        end = start + k.shape[2]
        if end > self.allocated:
            self._grow(min(self.capacity, -(-end // STEP) * STEP))
        self.keys[:, :, start:end, :] = k
        self.values[:, :, start:end, :] = v
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def _grow(self, size: int) -> None:
        B, heads, _, dim = self.shape
        extra = (B, heads, size - self.allocated, dim)
        if self.keys is None:
            self.keys, self.values = mx.zeros(extra, dtype=self.dtype), mx.zeros(extra, dtype=self.dtype)
        else:
            self.keys = mx.concatenate([self.keys, mx.zeros(extra, dtype=self.dtype)], axis=2)
            self.values = mx.concatenate([self.values, mx.zeros(extra, dtype=self.dtype)], axis=2)

    def arrays(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class ModelCache:
    """The whole model's cache plus how many positions hold valid entries."""

    def __init__(self, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.capacity = capacity
        self.length = 0
        self.layers = [KVCache(capacity, n_kv_heads, head_dim, dtype) for _ in range(n_layers)]
        # a decode step already under way for position `length` (see MLXModel.sample): (position, token, logits)
        self.pending: tuple[int, mx.array, mx.array] | None = None

    def truncate(self, length: int) -> None:
        """Forget positions >= length (entries past it are overwritten by the next write)."""
        self.length = max(0, min(length, self.length))
        self.pending = None

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers for a in layer.arrays()]

    @property
    def nbytes(self) -> int:
        """Bytes allocated so far (the buffers grow towards `capacity` in steps)."""
        return sum(a.nbytes for a in self.arrays())
