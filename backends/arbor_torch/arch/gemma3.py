"""Gemma 3's block: Gemma 2's sandwich (gemma2.py: its norms, GeGLU, scaled embeddings, decode strategies) with
an RMSNorm over each head's q and k before RoPE.

Its sliding layers read their own RoPE tables (a base of their own, never scaled: model.set_rope) and
keep a ring of slots (cache.py); both are the strategies' business, fed by the config's layer types.
"""

from __future__ import annotations

import torch
from torch import nn

from . import gemma2
from .gemma2 import attention_out, decode_strategies, feed_forward, post_attention
from .pieces import Layer, apply_rope, embed, final, heads_of, rms_norm

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("gemma3_text",)
NORM_OFFSET = QK_NORM = SANDWICH = True


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """Gemma 2's weights by role, and the q/k norms."""
    a = block.self_attn
    return gemma2.layer_of(block, tensors)._replace(q_norm=a.q_norm.weight, k_norm=a.k_norm.weight)


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """As llama.pre_attention, with each head's q and k normed before RoPE."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps, True), layer)
    q, k = rms_norm(q, layer.q_norm, layer.eps, True), rms_norm(k, layer.k_norm, layer.eps, True)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
