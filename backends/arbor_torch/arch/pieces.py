"""The pieces every architecture family's block is made of, as plain functions over explicit tensors.

A family (llama.py, gemma3.py) writes its block from these; the three decode strategies call the
family's functions and differ only in how attention reads the cache (runner.py picks the strategy).
A block's weights reach the functions as a `Layer`: the eager modules' projections (float, LoRA-wrapped
or quantized Linears), or, for the CUDA graph whose compiled functions take tensors only, (weight,
bias) pairs of the float weights.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# x -> x @ W.T + b: a module (nn.Linear, a quantized Linear, a LoRA wrapper) or the pair (W, b)
Projection = Union[nn.Module, tuple[torch.Tensor, Union[torch.Tensor, None]]]


class Layer(NamedTuple):
    """One block's weights and shapes, named by role. `qkv` is one fused projection (q, k and v side by
    side) or three; `gate_up` one fused or two. The q/k norms are Gemma's and Qwen3's, the two output norms
    Gemma's (None elsewhere); `rope` is False on SmolLM3's layers without position encoding."""
    input_norm: torch.Tensor
    qkv: tuple
    o: Projection
    mlp_norm: torch.Tensor  # the norm of the MLP's input
    gate_up: tuple
    down: Projection
    heads: tuple[int, int, int]  # query heads, key/value heads, head dim
    eps: float
    gelu: bool  # GeGLU with the tanh GELU (Gemma), else SwiGLU
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None
    rope: bool = True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """x / rms(x) * weight, or Gemma's x / rms(x) * (1 + weight) (`offset`) computed in float32."""
    # normalise in float32 whatever the weights' dtype: bf16 variance loses too much
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (..., heads, T, head_dim); cos/sin: (T, rotary_dim), HF's half-split layout over the first rotary_dim dims
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x, rest = x[..., :rotary], x[..., rotary:]  # a partial_rotary_factor < 1: the rest passes through
    return torch.cat((x * cos + rotate_half(x) * sin, rest), dim=-1)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's soft-capping of attention scores and logits); x itself when no cap is set."""
    return x if cap is None else torch.tanh(x / cap) * cap


def linear(x: torch.Tensor, projection: Projection) -> torch.Tensor:
    if isinstance(projection, tuple):
        return F.linear(x, projection[0], projection[1])
    return projection(x)


def project(x: torch.Tensor, projections: tuple, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """The outputs of `sizes` rows each: one fused matmul split, or one matmul per output."""
    if len(projections) == 1:
        return linear(x, projections[0]).split(sizes, dim=-1)
    return tuple(linear(x, p) for p in projections)


def heads_of(x: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the normed x (..., T, hidden) as (..., heads, T, head_dim), before any norm or RoPE."""
    n_heads, n_kv, d = layer.heads
    q, k, v = project(x, layer.qkv, [n_heads * d, n_kv * d, n_kv * d])
    return (q.unflatten(-1, (n_heads, d)).transpose(-3, -2), k.unflatten(-1, (n_kv, d)).transpose(-3, -2),
            v.unflatten(-1, (n_kv, d)).transpose(-3, -2))


def mlp(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """SwiGLU, or GeGLU with the tanh GELU, of the normed x."""
    if len(layer.gate_up) == 1:
        gate, up = linear(x, layer.gate_up[0]).chunk(2, dim=-1)
    else:
        gate, up = (linear(x, p) for p in layer.gate_up)
    # the activation stays a temporary: a long prefill chunk's (T, intermediate) tensors are the largest here
    return linear((F.gelu(gate, approximate="tanh") if layer.gelu else F.silu(gate)) * up, layer.down)


def embed(tokens: torch.Tensor, table: nn.Module, multiplier: float | torch.Tensor | None) -> torch.Tensor:
    """The tokens' rows of the table, scaled by `multiplier` in the table's dtype (Gemma: sqrt(hidden)); a
    tensor multiplier is that number made once (the CUDA graph's, on its device)."""
    x = table(tokens)
    if multiplier is None:
        return x
    if not isinstance(multiplier, torch.Tensor):
        multiplier = torch.tensor(multiplier, dtype=x.dtype)
    return x * multiplier


def final(x: torch.Tensor, norm: nn.Module, head: nn.Module, cap: float | None = None) -> torch.Tensor:
    """The logits of the last block's output: its norm, the output head, then the soft cap (config's
    final_logit_softcapping, Gemma) if one is set."""
    return soft_cap(head(norm(x)), cap)


def projections(block: nn.Module, tensors: bool) -> dict:
    """The block's projections for a Layer: its modules, or (tensors) (weight, bias) pairs of the fused
    float weights (model.fuse_layer made them)."""
    a, m = block.self_attn, block.mlp
    if tensors:
        return dict(qkv=((a.qkv_weight, a.qkv_bias),), o=(a.o_proj.weight, a.o_proj.bias),
                    gate_up=((m.gate_up_weight, None),), down=(m.down_proj.weight, m.down_proj.bias))
    qkv = (a.q_proj, a.k_proj, a.v_proj) if a.qkv_proj is None else (a.qkv_proj,)
    gate_up = (m.gate_proj, m.up_proj) if m.gate_up_proj is None else (m.gate_up_proj,)
    return dict(qkv=qkv, o=a.o_proj, gate_up=gate_up, down=m.down_proj)


def shapes(block: nn.Module) -> dict:
    a = block.self_attn
    return dict(heads=(a.n_heads, a.n_kv_heads, a.head_dim), eps=block.input_layernorm.eps, gelu=block.mlp.gelu)
