"""MLXModel: a loaded Transformer plus the backend operations arbor's generation loop needs.

Decode keeps the device busy. generate.py asks for one token at a time
(`lm.sample(lm.decode(token, cache), …) -> int`), and MLX evaluates lazily, so `sample` does
what mlx-lm's generate_step does: it picks the token on the device, queues the next decode step
on that (still lazy) token with `mx.async_eval`, and only then waits for the token's value.
While the host detokenizes and streams it, the device already runs the next step; `decode`
finds that step pending on the cache and returns its logits. A step nobody asks for (the
generation stopped) is dropped: it only wrote past `cache.length`, where the next write goes.
"""

from __future__ import annotations

import functools
import os
import secrets

import mlx.core as mx
import numpy as np
import psutil
from mlx.utils import tree_flatten, tree_unflatten

from arbor_cli.backend import SamplingParams
from arbor_cli.errors import ContextError, CorruptModelError, OutOfMemoryError
from arbor_cli.planner import kv_cache_tokens
from arbor_cli.rope import RopeTables

from .cache import SCALE_DTYPE, ModelCache
from .memory import memory_info, peak_memory, reset_peak_memory
from .model import Transformer

# Tensors some exporters write that are derived, not learned: safe to skip.
IGNORED_KEYS = ("rotary_emb.inv_freq",)
GPU_PREFILL_CHUNK = 2048  # mlx-lm's prefill step on Apple GPUs
CPU_PREFILL_CHUNK = 512
KV_BITS = (8, 16)


def _on_device(fn):
    """Run on the model's device stream; out-of-memory becomes arbor's OutOfMemoryError."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            with mx.stream(self.stream):
                return fn(self, *args, **kwargs)
        except MemoryError as e:
            raise OutOfMemoryError(f"out of memory ({str(e).splitlines()[0][:120] if str(e) else 'MemoryError'})") \
                from None
        except RuntimeError as e:  # MLX reports a failed allocation as RuntimeError("[malloc…] Unable to allocate …")
            message = str(e)
            if "alloc" in message.lower() or "memory" in message.lower():
                raise OutOfMemoryError(f"out of memory ({message.splitlines()[0][:120]})") from None
            raise
    return wrapper


class RandomKey:
    """A seeded PRNG key, split once per draw: the same seed gives the same tokens."""

    def __init__(self, seed: int | None):
        self.key = mx.random.key(secrets.randbits(62) if seed is None else seed)

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


class MLXModel:
    def __init__(self, model: Transformer, device: str, dtype: str, kv_bits: int = 16):
        from . import DTYPES

        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.stream = mx.gpu if device == "gpu" else mx.cpu
        self.mx_dtype = DTYPES[dtype]
        self.weights_nbytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        self.act_element_bytes = self.mx_dtype.size
        # kv_bits 16: the cache in the model's dtype; 8: int8 codes plus a float16 scale per head and token
        self.kv_bits = kv_bits
        self.kv_element_bytes = 1 if kv_bits == 8 else self.mx_dtype.size
        self.kv_scale_bytes = SCALE_DTYPE.size if kv_bits == 8 else 0
        self.prefill_chunk = int(os.environ.get("ARBOR_PREFILL_CHUNK", "0")) or (
            GPU_PREFILL_CHUNK if device == "gpu" else CPU_PREFILL_CHUNK)
        self._last: tuple[mx.array, ModelCache] | None = None  # the latest logits prefill/decode returned

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str, dtype: str, kv_bits: int = 16) -> MLXModel:
        from . import DTYPES

        cfg = checkpoint.config
        model = Transformer(cfg)
        state: dict[str, mx.array] = {}
        for path in checkpoint.weight_files:
            try:
                state.update(mx.load(str(path), format="safetensors"))
            except (RuntimeError, ValueError, OSError) as e:
                raise CorruptModelError(f"{path} is unreadable ({str(e).splitlines()[0][:120]}); "
                                        "delete the model and pull it again") from None
        state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = dict(tree_flatten(model.parameters()))
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
            raise CorruptModelError(f"weights in {checkpoint.path} do not match its config.json ({detail}); "
                                    "re-convert or re-download the model")
        for name, array in state.items():
            if tuple(array.shape) != tuple(expected[name].shape):
                raise CorruptModelError(f"{name} has shape {tuple(array.shape)} in {checkpoint.path}, config.json "
                                        f"implies {tuple(expected[name].shape)}; re-convert the model")
        target = DTYPES[dtype]
        with mx.stream(mx.gpu if device == "gpu" else mx.cpu):
            model.update(tree_unflatten([(k, v.astype(target)) for k, v in state.items()]))
            mx.eval(model.parameters())
        return cls(model, device, dtype, kv_bits)

    # ---- the backend protocol -----------------------------------------------------------
    def memory(self):
        return memory_info(self.device)

    def reset_peak_memory(self) -> None:
        if self.device == "gpu":
            mx.clear_cache()
            reset_peak_memory()

    def peak_memory(self) -> int:
        """Peak bytes MLX allocated on the GPU since reset_peak_memory (CPU: the process's resident size,
        as the torch backend reports it)."""
        if self.device == "gpu":
            return peak_memory()
        return int(psutil.Process().memory_info().rss)

    def num_parameters(self) -> int:
        return sum(a.size for _, a in tree_flatten(self.model.parameters()))

    def new_cache(self, capacity: int, bits: int | None = None) -> ModelCache:
        c = self.config
        return ModelCache(capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.mx_dtype,
                          bits=bits or self.kv_bits, window=c.sliding_window,
                          slots=kv_cache_tokens(c, capacity, self.prefill_chunk))

    def set_rope(self, rope: RopeTables, positions: int) -> None:
        self.model.set_rope(rope.inv_freq, rope.attention_factor, positions)

    @_on_device
    def prefill(self, ids: list[int], cache: ModelCache, chunk_size: int = 512) -> mx.array:
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check_room(cache, len(ids))
        cache.pending = None
        chunk_size = min(chunk_size, cache.max_chunk)  # a ring cache bounds how many queries one step may write
        for begin in range(0, len(ids), chunk_size):
            chunk = ids[begin:begin + chunk_size]
            out = self.model(mx.array([chunk], dtype=mx.int32), cache.length, cache.layers, last_only=True)
            cache.length += len(chunk)
            if begin + chunk_size < len(ids):
                mx.eval(cache.arrays())  # run this chunk now: bounds the graph and the attention workspace
        logits = out[0, -1].astype(mx.float32)
        mx.async_eval(logits)
        self._last = (logits, cache)
        return logits

    @_on_device
    def decode(self, token: int, cache: ModelCache) -> mx.array:
        self._check_room(cache, 1)
        pending, cache.pending = cache.pending, None
        if pending is not None and pending[:2] == (cache.length, token):
            logits = pending[2]  # queued by sample() while the host handled `token`
        else:
            logits = self._step(mx.array([[token]], dtype=mx.int32), cache)
        cache.length += 1
        self._last = (logits, cache)
        return logits

    def new_rng(self, seed: int | None) -> RandomKey:
        return RandomKey(seed)

    @_on_device
    def sample(self, logits, params: SamplingParams, rng: RandomKey, recent: list[int] = ()) -> int:
        source, self._last = self._last, None
        if not isinstance(logits, mx.array):
            logits = mx.array(np.asarray(logits, dtype=np.float32))
        token = self._pick(logits, params, rng, recent)
        if source is not None and source[0] is logits:
            cache = source[1]
            if cache.length < min(cache.capacity, self.model.rope_len()):
                mx.async_eval(token)
                step = self._step(token.reshape(1, 1), cache)  # the next decode, on the still-lazy token
                mx.async_eval(step)
                value = int(token.item())
                cache.pending = (cache.length, value, step)
                return value
        return int(token.item())

    @_on_device
    def logits(self, ids: list[int]) -> np.ndarray:
        tokens = mx.array([ids], dtype=mx.int32)
        if len(ids) <= self.prefill_chunk:
            return np.array(self.model(tokens, 0, None)[0].astype(mx.float32))
        # long inputs run in chunks through a scratch cache: the same math with a bounded attention workspace
        cache, rows = self.new_cache(len(ids), bits=16), []  # the full forward's keys: never quantized
        for begin in range(0, len(ids), self.prefill_chunk):
            out = self.model(tokens[:, begin:begin + self.prefill_chunk], begin, cache.layers)
            rows.append(np.array(out[0].astype(mx.float32)))
        return np.concatenate(rows)

    # ---- helpers ----------------------------------------------------------------------------
    def _step(self, token: mx.array, cache: ModelCache) -> mx.array:
        """Logits of one token (1, 1) at position cache.length, written into the cache (length unchanged)."""
        return self.model(token, cache.length, cache.layers)[0, -1].astype(mx.float32)

    @staticmethod
    def _pick(logits: mx.array, params: SamplingParams, rng: RandomKey, recent) -> mx.array:
        """The next token (a lazy scalar), with the torch backend's semantics for every option."""
        if params.repetition_penalty != 1.0 and len(recent):
            hit = mx.zeros(logits.shape, dtype=mx.bool_)
            hit[mx.array(sorted(set(recent)))] = True
            p = params.repetition_penalty
            logits = mx.where(hit, mx.where(logits > 0, logits / p, logits * p), logits)
        if params.greedy:
            return mx.argmax(logits)
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = mx.min(mx.topk(logits, min(params.top_k, logits.shape[-1])))
            logits = mx.where(logits < kth, -mx.inf, logits)
        if params.top_p < 1.0:
            order = mx.argsort(-logits)  # descending
            probs = mx.softmax(logits[order], axis=-1)
            drop = mx.cumsum(probs) - probs >= params.top_p  # keep the first token always
            logits = mx.where(drop[mx.argsort(order)], -mx.inf, logits)
        return mx.random.categorical(logits, key=rng.next())

    def _check_room(self, cache: ModelCache, n: int) -> None:
        if cache.length + n > cache.capacity:
            raise ContextError(f"the context is full ({cache.capacity} tokens); start a new conversation "
                               "or raise --context")
        if cache.length + n > self.model.rope_len():
            raise ContextError(f"position {cache.length + n} is beyond the RoPE table; set_rope for the context first")
