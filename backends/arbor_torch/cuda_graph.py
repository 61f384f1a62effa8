"""The CUDA decode step: one token through every layer, replayed from a captured CUDA graph.

At the default model's size a decode step is bound by kernel launches, not bytes: ~300 small
kernels a token. Capturing the whole step in one CUDA graph removes the launch gaps; the token
and its position live in device tensors the graph reads, so one capture serves every position
of a cache. Attention over the cache is the split-KV Triton kernel (split_kv.py), which reads
only the valid part of the cache and keeps every SM busy even at 128K tokens. The math is the
same as model.py's (same modules, same weights): RMSNorm, RoPE, GQA attention, SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import ModelCache
from .model import Transformer, rotate_half
from .split_kv import SplitKVAttention

WARMUP_STEPS = 2


class GraphDecoder:
    """Decode steps for one cache, captured once and replayed per token."""

    def __init__(self, model: Transformer, cache: ModelCache):
        cfg = model.config
        self.model, self.cache = model, cache
        device = model.model.embed_tokens.weight.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = torch.ones(1, dtype=torch.int32, device=device)
        self.attention = SplitKVAttention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                          cache.capacity, device, model.model.embed_tokens.weight.dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.rope_ptr = 0  # the RoPE table the graph reads: a new table means a new capture

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """(vocab,) float32 logits for self.token at self.position; writes the token's K/V."""
        m, cfg = self.model, self.model.config
        cos = m.rope_cos.index_select(0, self.position)  # (1, D)
        sin = m.rope_sin.index_select(0, self.position)
        self.length.copy_(self.position + 1)
        x = m.model.embed_tokens(self.token)  # (1, hidden)
        for layer, kv in zip(m.model.layers, self.cache.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(cfg.num_attention_heads, cfg.head_dim)
            k = attn.k_proj(h).view(cfg.num_key_value_heads, cfg.head_dim)
            v = attn.v_proj(h).view(cfg.num_key_value_heads, cfg.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kv.k.index_copy_(2, self.position, k.view(1, -1, 1, cfg.head_dim))
            kv.v.index_copy_(2, self.position, v.view(1, -1, 1, cfg.head_dim))
            y = self.attention(q.contiguous(), kv.k, kv.v, self.length)
            x = x + attn.o_proj(y.view(1, -1))
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
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
        if self.graph is None or self.rope_ptr != self.model.rope_cos.data_ptr():
            self.rope_ptr = self.model.rope_cos.data_ptr()
            self.position.fill_(position)
            self.token.fill_(token)
            self.capture()
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits
