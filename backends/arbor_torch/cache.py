"""Preallocated KV cache: one buffer per layer, sized by the caller, written in place."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one layer for up to `capacity` positions. (B, n_kv_heads, capacity, head_dim)."""

    def __init__(self, capacity: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        shape = (1, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class ModelCache:
    """The whole model's cache plus how many positions hold valid entries."""

    def __init__(self, capacity: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.capacity = capacity
        self.length = 0
        self.decoder = None  # the CUDA-graph decode step bound to these buffers, built on first decode
        self.layers = [KVCache(capacity, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (entries past it are overwritten by the next write)."""
        self.length = max(0, min(length, self.length))

    @property
    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)
