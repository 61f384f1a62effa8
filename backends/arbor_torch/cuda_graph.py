"""The CUDA decode step: one token through every layer, replayed from a captured CUDA graph.

At the default model's size a decode step is bound by kernel launches, not bytes: ~300 small
kernels a token. Capturing the whole step in one CUDA graph removes the launch gaps; the token
and its position live in device tensors the graph reads, so one capture serves every position
of a cache. Attention over the cache is the split-KV Triton kernel (split_kv.py), which reads
only the valid part of the cache and keeps every SM busy even at 128K tokens. The rest is the
model's family's block (arch/), the functions the eager forward runs, here on the fused float
weights as tensors; Gemma's sliding layers rotate with their own RoPE tables and keep a ring of
slots (cache.py).

Every cache cache.py makes is read in place: 16-bit, or int8 codes with float16 scales (the new
token's K/V are quantized inside the graph, the cache dequantized in the kernel's registers); a
layer's slots are its whole context or a ring, the new token going to slot position % slots.
"""

from __future__ import annotations


import torch

from arbor_core import kv_layout
from arbor_core.number_input import env_switch

from .arch import family
from .arch.pieces import embed, final
from .cache import ModelCache, quantize_int8
from .model import Transformer

WARMUP_STEPS = 3


def new_token_kv(q, k, v, heads: tuple[int, int, int], quantized: bool):
    """A family's pre_attention output for one token, (heads, 1, D) q and (kv_heads, 1, D) k and v, as the
    split-KV kernel and the cache take them: (n_heads, D) q and (1, n_kv, 1, D) k and v; with `quantized`,
    k and v as int8 codes followed by their float16 scales (cache.quantize_int8)."""
    n_heads, n_kv, d = heads
    k, v = k.reshape(1, n_kv, 1, d), v.reshape(1, n_kv, 1, d)
    q = q.reshape(n_heads, d)
    if quantized:
        return (q.contiguous(),) + quantize_int8(k) + quantize_int8(v)
    return q.contiguous(), k, v


def layer_halves(arch, quantized: bool):
    """The family's block split around attention as the graph runs it, each half fused by torch.compile:
    pre(x, layer, cos, sin) -> new_token_kv's tensors, and post(x, y, layer) -> x."""
    def pre(x, layer, cos, sin):
        return new_token_kv(*arch.pre_attention(x, layer, cos, sin), layer.heads, quantized)

    def post(x, y, layer):
        return arch.post_attention(x, y.view(1, -1), layer)

    return compiled(pre), compiled(post)


HALVES_RECOMPILE_LIMIT = 64  # compiled variants one process may keep of each half (see compiled)


def compiled(fn):
    """fn fused by torch.compile (ARBOR_COMPILE=0: eager, unfused).

    Every family's halves share two code objects (layer_halves' pre and post), and each model shape, dtype,
    family and cache kind is one more compiled variant of them. Dynamo's default of 8 variants a code object
    is reached by a process that loads several models (the test suite, a bench over shapes), and fullgraph
    turns that into an error, so the limit is raised for them."""
    if not env_switch("ARBOR_COMPILE", True):
        return fn
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), HALVES_RECOMPILE_LIMIT))
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
        self.arch = family(cfg)
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
        model.fuse_projections()  # fused at load already (runner.py); a model made otherwise is fused here
        self.pre_attention, self.post_attention = layer_halves(self.arch, self.quantized)

    def _tables(self) -> tuple:
        m = self.model
        return tuple(t for t in (m.rope_cos, m.rope_sin, m.local_cos, m.local_sin) if t is not None)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """(vocab,) float32 logits for self.token at self.position; writes the token's K/V."""
        m = self.model
        rope = {False: (m.rope_cos.index_select(0, self.position), m.rope_sin.index_select(0, self.position))}
        if m.local_cos is not None:  # Gemma's sliding layers: their own base, never scaled
            rope[True] = (m.local_cos.index_select(0, self.position), m.local_sin.index_select(0, self.position))
        slot = {self.cache.capacity: self.position}
        for slots in self.ring_slots:
            slot[slots] = self.position.remainder(slots)
        self.length.copy_(self.position + 1)
        x = embed(self.token, m.model.embed_tokens, self.embed_scale)  # (1, hidden)
        for block, kv, attention in zip(m.model.layers, self.cache.layers, self.attention):
            layer = self.arch.layer_of(block, tensors=True)
            cos, sin = rope[block.self_attn.window is not None and m.local_cos is not None]
            new = self.pre_attention(x, layer, cos, sin)
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
            x = self.post_attention(x, y, layer)
        return final(x, m.model.norm, m.lm_head, m.config.final_logit_softcapping)[0].float()

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
