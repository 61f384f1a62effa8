"""SmolLM3's block: Llama's, except that some layers rotate neither q nor k (no position encoding, "NoPE").

Which layers is the config's `no_rope_layers` (transformers' SmolLM3Config: 1 = RoPE, 0 = none; by default
every fourth layer has none, as SmolLM3-3B). The flag reaches the block through the Layer (`rope`), so the
eager forward, the CUDA graph and the compiled CPU step all skip the rotation on the same layers; the
strategies still pass every layer its cos/sin, unread there.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import attention_out, decode_strategies, embed, feed_forward, final, post_attention
from .pieces import Layer, apply_rope, heads_of, projections, rms_norm, shapes

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("smollm3",)
NORM_OFFSET = QK_NORM = SANDWICH = False


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """Llama's roles, and whether this layer rotates (pieces.projections says what `tensors` changes)."""
    return Layer(input_norm=block.input_layernorm.weight, mlp_norm=block.post_attention_layernorm.weight,
                 rope=block.self_attn.uses_rope, **projections(block, tensors), **shapes(block))


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """As llama.pre_attention; a NoPE layer's q and k go to attention unrotated."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps), layer)
    if not layer.rope:
        return q, k, v
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
