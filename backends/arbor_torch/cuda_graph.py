"""The CUDA decode step: one token through every layer, replayed from a captured CUDA graph.

At the default model's size a decode step is bound by kernel launches, not bytes: ~300 small
kernels a token. Capturing the whole step in one CUDA graph removes the launch gaps; the token
and its position live in device tensors the graph reads, so one capture serves every position
of a cache. Attention over the cache is the split-KV Triton kernel (split_kv.py), which reads
only the valid part of the cache and keeps every SM busy even at 128K tokens. The math is the
same as model.py's (same modules, same weights): RMSNorm, RoPE, GQA attention, SwiGLU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cache import ModelCache
from .model import Transformer, rotate_half

WARMUP_STEPS = 3


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def pre_attention(x, norm_weight, qkv_weight, qkv_bias, cos, sin, shapes, eps):
    """RMSNorm, the fused q/k/v projection and RoPE: (n_heads, D) q, (1, n_kv, 1, D) k and v."""
    n_heads, n_kv, d = shapes
    qkv = F.linear(rms_norm(x, norm_weight, eps), qkv_weight, qkv_bias)[0]
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d])
    q, k = q.view(n_heads, d), k.view(n_kv, d)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.contiguous(), k.view(1, n_kv, 1, d), v.view(1, n_kv, 1, d)


def post_attention(x, y, o_weight, o_bias, norm_weight, gate_up_weight, down_weight, eps):
    """Output projection and residual, then RMSNorm, SwiGLU and residual."""
    x = x + F.linear(y.view(1, -1), o_weight, o_bias)
    gate, up = F.linear(rms_norm(x, norm_weight, eps), gate_up_weight).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_weight)


def compiled_layer_parts():
    """The two halves of a layer fused by torch.compile (ARBOR_COMPILE=0: eager, unfused)."""
    if os.environ.get("ARBOR_COMPILE", "1") == "0":
        return pre_attention, post_attention
    return (torch.compile(pre_attention, dynamic=False, fullgraph=True),
            torch.compile(post_attention, dynamic=False, fullgraph=True))


class GraphDecoder:
    """Decode steps for one cache, captured once and replayed per token."""

    def __init__(self, model: Transformer, cache: ModelCache):
        cfg = model.config
        self.model, self.cache = model, cache
        device = model.model.embed_tokens.weight.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = torch.ones(1, dtype=torch.int32, device=device)
        from .split_kv import SplitKVAttention  # Triton: present wherever CUDA torch is

        self.attention = SplitKVAttention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                          cache.capacity, device, model.model.embed_tokens.weight.dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.rope_key: tuple = ()  # the RoPE tables the graph reads (cos, sin addresses): new tables, new capture
        if not hasattr(model.model.layers[0].self_attn, "qkv_weight"):
            model.fuse_projections()
        self.pre_attention, self.post_attention = compiled_layer_parts()

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """(vocab,) float32 logits for self.token at self.position; writes the token's K/V."""
        m, cfg = self.model, self.model.config
        cos = m.rope_cos.index_select(0, self.position)  # (1, D)
        sin = m.rope_sin.index_select(0, self.position)
        self.length.copy_(self.position + 1)
        x = m.model.embed_tokens(self.token)  # (1, hidden)
        shapes = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        for layer, kv in zip(m.model.layers, self.cache.layers):
            a, mlp = layer.self_attn, layer.mlp
            q, k, v = self.pre_attention(x, layer.input_layernorm.weight, a.qkv_weight, a.qkv_bias, cos, sin,
                                         shapes, cfg.rms_norm_eps)
            kv.k.index_copy_(2, self.position, k)
            kv.v.index_copy_(2, self.position, v)
            y = self.attention(q, kv.k, kv.v, self.length)
            x = self.post_attention(x, y, a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
                                    mlp.gate_up_weight, mlp.down_proj.weight, cfg.rms_norm_eps)
        return m.lm_head(m.model.norm(x))[0].float()

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        saved = self.cache.length
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):  # compile Triton kernels, settle the allocator
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()
        self.cache.length = saved  # warm-up and capture wrote position self.position only: overwritten later

    def __call__(self, token: int, position: int) -> torch.Tensor:
        rope_key = (self.model.rope_cos.data_ptr(), self.model.rope_sin.data_ptr())
        if self.graph is None or self.rope_key != rope_key:  # both: a new cos may land where the old one was
            self.rope_key = rope_key
            self.position.fill_(position)
            self.token.fill_(token)
            self.capture()
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits
