"""SmolLM3's block in MLX (transformers' SmolLM3DecoderLayer): Llama's, except that the layers the config's
`no_rope_layers` marks 0 rotate neither q nor k (no position encoding, "NoPE")."""

from __future__ import annotations

import mlx.core as mx

from arbor_core.config import ArborConfig

from ..layers import Rope
from . import llama
from .llama import embed, norm, post_attention

__all__ = ["MODEL_TYPES", "Layer", "embed", "norm", "post_attention", "pre_attention"]

MODEL_TYPES = ("smollm3",)


class Layer(llama.Layer):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.uses_rope = cfg.layer_rope(layer)


def pre_attention(x: mx.array, layer: Layer, rope: Rope, start: int) -> tuple[mx.array, mx.array, mx.array]:
    q, k, v = layer.self_attn.project(layer.input_layernorm(x))
    if not layer.uses_rope:
        return q, k, v
    return rope(q, start), rope(k, start), v
