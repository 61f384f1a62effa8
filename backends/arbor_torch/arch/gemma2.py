"""Gemma 2's block, the sandwich Gemma 3 builds on: norms before and after attention and the MLP, GeGLU,
embeddings scaled by sqrt(hidden), every RMSNorm weight stored as an offset from 1.

What sets Gemma 2 apart is outside the block: soft-capped attention scores (attn_logit_softcapping, which the
eager strategy's attention applies: model.capped_attention) and logits (final_logit_softcapping: pieces.final),
and sliding layers alternating with global ones (the config's layer types; rings in cache.py).
"""

from __future__ import annotations

import torch
from torch import nn

from arbor_core.config import ArborConfig

from .pieces import Layer, apply_rope, embed, final, heads_of, linear, mlp, projections, rms_norm, shapes

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("gemma2",)
NORM_OFFSET = SANDWICH = True
QK_NORM = False


def decode_strategies(config: ArborConfig) -> frozenset[str]:
    """Eager alone while attention scores are soft-capped: the CUDA graph's split-KV kernel and the compiled CPU
    step's merged softmax take the scores as they are. Never the compiled CPU step: it reads one whole-context
    cache per layer, and the sliding layers keep rings (and Gemma 3's their own RoPE tables)."""
    if config.attn_logit_softcapping is not None:
        return frozenset({"eager"})
    return frozenset({"eager", "cuda_graph"})


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """The block's weights by role; HF's post_attention_layernorm is the attention output's norm here."""
    return Layer(input_norm=block.input_layernorm.weight, mlp_norm=block.pre_feedforward_layernorm.weight,
                 attention_out_norm=block.post_attention_layernorm.weight,
                 mlp_out_norm=block.post_feedforward_layernorm.weight, **projections(block, tensors), **shapes(block))


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """As llama.pre_attention, with the input norm's weight an offset from 1."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps, True), layer)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_out(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The attention output projected and normed before its residual."""
    return x + rms_norm(linear(y, layer.o), layer.attention_out_norm, layer.eps, True)


def feed_forward(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The MLP between a norm of its input and one of its output."""
    return x + rms_norm(mlp(rms_norm(x, layer.mlp_norm, layer.eps, True), layer), layer.mlp_out_norm, layer.eps, True)


def post_attention(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Everything after attention (the decode strategies' second half): attention_out, then feed_forward."""
    return feed_forward(attention_out(x, y, layer), layer)
