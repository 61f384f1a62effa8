"""The CUDA decode step: one token through every layer, replayed from a captured CUDA graph.

At the default model's size a decode step is bound by kernel launches, not bytes: ~300 small
kernels a token. Capturing the whole step in one CUDA graph removes the launch gaps; the token
and its position live in device tensors the graph reads, so one capture serves every position
of a cache. Attention over the cache is the split-KV Triton kernel (split_kv.py), which reads
only the valid part of the cache and keeps every SM busy even at 128K tokens. The math is the
same as model.py's (same modules, same weights): RMSNorm, RoPE, GQA attention, SwiGLU; and for
Gemma its q/k norms, norms around attention and the MLP, GeGLU, scaled embeddings, and sliding
layers that rotate with their own RoPE tables and keep a ring of slots (cache.py).

Every cache cache.py makes is read in place: 16-bit, or int8 codes with float16 scales (the new
token's K/V are quantized inside the graph, the cache dequantized in the kernel's registers); a
layer's slots are its whole context or a ring, the new token going to slot position % slots.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from arbor_core import kv_layout

from .cache import ModelCache, quantize_int8
from .model import Transformer, rotate_half

WARMUP_STEPS = 3


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """model.RMSNorm's math: Llama's weight x normalised, or Gemma's normalised x (1 + weight) in float32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def pre_attention(x, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, cos, sin, shapes, eps,
                  gemma: bool, quantized: bool):
    """RMSNorm, the fused q/k/v projection, Gemma's q/k norms and RoPE: (n_heads, D) q, (1, n_kv, 1, D) k
    and v; with `quantized`, k and v as int8 codes followed by their float16 scales (cache.quantize_int8)."""
    n_heads, n_kv, d = shapes
    qkv = F.linear(rms_norm(x, norm_weight, eps, gemma), qkv_weight, qkv_bias)[0]
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d])
    q, k = q.view(n_heads, d), k.view(n_kv, d)
    if gemma:
        q, k = rms_norm(q, q_norm_weight, eps, True), rms_norm(k, k_norm_weight, eps, True)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = k.view(1, n_kv, 1, d), v.view(1, n_kv, 1, d)
    if quantized:
        return (q.contiguous(),) + quantize_int8(k) + quantize_int8(v)
    return q.contiguous(), k, v


def post_attention(x, y, o_weight, o_bias, norm_weight, gate_up_weight, down_weight, eps):
    """Output projection and residual, then RMSNorm, SwiGLU and residual."""
    x = x + F.linear(y.view(1, -1), o_weight, o_bias)
    gate, up = F.linear(rms_norm(x, norm_weight, eps), gate_up_weight).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_weight)


def gemma_post_attention(x, y, o_weight, o_bias, post_attention_weight, pre_mlp_weight, post_mlp_weight,
                         gate_up_weight, down_weight, eps):
    """Gemma's sandwich: the attention output normed before its residual, the MLP (GeGLU, tanh GELU) between
    a norm of its input and a norm of its output."""
    x = x + rms_norm(F.linear(y.view(1, -1), o_weight, o_bias), post_attention_weight, eps, True)
    gate, up = F.linear(rms_norm(x, pre_mlp_weight, eps, True), gate_up_weight).chunk(2, dim=-1)
    return x + rms_norm(F.linear(F.gelu(gate, approximate="tanh") * up, down_weight), post_mlp_weight, eps, True)


def compiled(fn):
    """fn fused by torch.compile (ARBOR_COMPILE=0: eager, unfused)."""
    if os.environ.get("ARBOR_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn, dynamic=False, fullgraph=True)


class GraphDecoder:
    """Decode steps for one cache, captured once and replayed per token."""

    def __init__(self, model: Transformer, cache: ModelCache):
        cfg = model.config
        self.model, self.cache = model, cache
        device = model.model.embed_tokens.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = torch.ones(1, dtype=torch.int32, device=device)
        self.quantized = cache.layers[0].bits == 8
        self.gemma = cfg.gemma
        self.embed_scale = (torch.tensor(cfg.embedding_multiplier, dtype=dtype, device=device)
                            if cfg.embedding_multiplier else None)
        from .split_kv import SplitKVAttention  # Triton: present wherever CUDA torch is

        # one kernel layout (and workspace) per distinct (slots, window): Gemma has two, a Llama one
        self.attention, kernels = [], {}
        for i, kv in enumerate(cache.layers):
            key = (kv.slots, cfg.layer_window(i))
            if key not in kernels:
                kernels[key] = SplitKVAttention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                                kv.slots, device, dtype, window=key[1], scale=cfg.attention_scale,
                                                quantized=self.quantized)
            self.attention.append(kernels[key])
        self.ring_slots = sorted({kv.slots for kv in cache.layers if kv.slots < cache.capacity})
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.rope_key: tuple = ()  # the RoPE tables the graph reads (their addresses): new tables, new capture
        if not hasattr(model.model.layers[0].self_attn, "qkv_weight"):
            model.fuse_projections()
        self.pre_attention = compiled(pre_attention)
        self.post_attention = compiled(gemma_post_attention if self.gemma else post_attention)

    def _tables(self) -> tuple:
        m = self.model
        return tuple(t for t in (m.rope_cos, m.rope_sin, m.local_cos, m.local_sin) if t is not None)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """(vocab,) float32 logits for self.token at self.position; writes the token's K/V."""
        m, cfg = self.model, self.model.config
        rope = {False: (m.rope_cos.index_select(0, self.position), m.rope_sin.index_select(0, self.position))}
        if m.local_cos is not None:  # Gemma's sliding layers: their own base, never scaled
            rope[True] = (m.local_cos.index_select(0, self.position), m.local_sin.index_select(0, self.position))
        slot = {self.cache.capacity: self.position}
        for slots in self.ring_slots:
            slot[slots] = self.position.remainder(slots)
        self.length.copy_(self.position + 1)
        x = m.model.embed_tokens(self.token)  # (1, hidden)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        shapes = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        eps = cfg.rms_norm_eps
        for layer, kv, attention in zip(m.model.layers, self.cache.layers, self.attention):
            a, mlp = layer.self_attn, layer.mlp
            cos, sin = rope[a.window is not None and m.local_cos is not None]
            q_norm = k_norm = None
            if self.gemma:
                q_norm, k_norm = a.q_norm.weight, a.k_norm.weight
            new = self.pre_attention(x, layer.input_layernorm.weight, a.qkv_weight, a.qkv_bias, q_norm, k_norm,
                                     cos, sin, shapes, eps, self.gemma, self.quantized)
            where = slot[kv.slots]
            if self.quantized:
                q, k, new_k_scale, v, new_v_scale = new
                kv.k_scale.index_copy_(2, where, new_k_scale)
                kv.v_scale.index_copy_(2, where, new_v_scale)
            else:
                q, k, v = new
            kv.k.index_copy_(2, where, k)
            kv.v.index_copy_(2, where, v)
            y = attention(q, kv.k, kv.v, self.length, k_scale=kv.k_scale, v_scale=kv.v_scale)
            if self.gemma:
                x = self.post_attention(x, y, a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
                                        layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight,
                                        mlp.gate_up_weight, mlp.down_proj.weight, eps)
            else:
                x = self.post_attention(x, y, a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
                                        mlp.gate_up_weight, mlp.down_proj.weight, eps)
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
        # warm-up and capture wrote this token's K/V at its own slot only, as the replay will again
        self.cache.length = saved

    def __call__(self, token: int, position: int) -> torch.Tensor:
        rope_key = tuple(t.data_ptr() for t in self._tables())
        if self.graph is None or self.rope_key != rope_key:  # both: a new cos may land where the old one was
            self.rope_key = rope_key
            self.position.fill_(position)
            self.token.fill_(token)
            self.capture()
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        for kv in self.cache.layers:  # the ring's bookkeeping, as KVCache.update keeps it on the eager path
            kv.oldest = kv_layout.oldest_held(kv.oldest, position + 1, kv.slots)
        return self.logits
