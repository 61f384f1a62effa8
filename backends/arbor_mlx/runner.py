"""MLXModel: a loaded Transformer plus the backend operations arbor's generation loop needs.

Decode is pipelined, as mlx-lm's generate_step is: MLXModel.sample says how.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import psutil
from mlx.utils import tree_flatten, tree_unflatten

from arbor_core.backend import SamplingParams, check_cache_arrays, check_room, check_rows, check_rows_fit
from arbor_core.errors import CorruptModelError, OutOfMemoryError
from arbor_core.number_input import env_number
from arbor_core.planner import layer_cache_tokens
from arbor_core.rope import RopeTables
from arbor_weights import quantized
from arbor_weights.checkpoint import check_tensors

from .blocks import install_blocks, num_parameters
from .cache import SCALE_DTYPE, STEP, CachePool, ModelCache
from .memory import memory_info, peak_memory, reset_peak_memory
from .layers import Rows
from .model import Transformer
from .sampling import RandomKey, sample_lazy

GPU_PREFILL_CHUNK = 2048  # mlx-lm's prefill step on Apple GPUs
CPU_PREFILL_CHUNK = 512
# a cached K/V element on the host (export_cache): bfloat16, which numpy lacks, travels as its 16 bits
HOST_STORE = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int8: np.int8}
# export_cache's names -> KVCache's attributes
CACHE_ARRAYS = {"k": "keys", "v": "values", "k_scale": "key_scales", "v_scale": "value_scales"}


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


class MLXModel:
    def __init__(self, model: Transformer, device: str, dtype: str, kv_bits: int = 16, quantize: str | None = None):
        from . import DTYPES

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
        self.prefill_chunk = env_number("ARBOR_PREFILL_CHUNK", 0) or (
            GPU_PREFILL_CHUNK if device == "gpu" else CPU_PREFILL_CHUNK)
        # measured on the CPU (135M model, float32, 40 tokens as 40 rows vs 30 + 10 vs 39 + a decode step vs
        # 30 + ten decode steps): bit for bit the same; so are its GGUF blocks run quantized, and the 0.5B
        # Qwen's (Q5_0, Q8_0, Q4_K, Q6_K); Metal's kernels were not measured
        self.exact_across_row_counts = device == "cpu"
        self.quantize = quantize  # "gguf-blocks": the checkpoint's blocks run quantized (blocks.py); None: floats
        self.active_rope: RopeTables | None = None  # the RopeTables the model's Rope was built from
        # the logits prefill/decode returned last, and their cache: sample() queues the next step for them
        self._latest: tuple[mx.array, ModelCache] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str, dtype: str, kv_bits: int = 16, blocks: bool = False) -> MLXModel:
        """`blocks`: a checkpoint's GGUF blocks run as MLX quantized layers (blocks.py); else, and for
        blocks no Linear or Embedding holds, their exact float32 values in `dtype`."""
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
        expected = {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}
        state, entries = quantized.split_state(check_tensors(state, expected, checkpoint.path, cfg.tie_word_embeddings))
        target = DTYPES[dtype]
        with mx.stream(mx.gpu if device == "gpu" else mx.cpu):
            held = len(entries)
            if blocks:
                entries = install_blocks(model, entries, target)
            held -= len(entries)
            for name, value in quantized.dequantize_state(_flat(entries), checkpoint.path).items():
                state[name] = mx.array(value)
            model.update(tree_unflatten([(k, v.astype(target)) for k, v in state.items()]))
            mx.eval(model.parameters())
        return cls(model, device, dtype, kv_bits, quantize=quantized.FORMAT if held else None)

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
        return num_parameters(self.model)

    def new_cache(self, capacity: int, rope: RopeTables | None = None, *, bits: int | None = None) -> ModelCache:
        c = self.config
        return ModelCache(capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.mx_dtype,
                          bits=bits or self.kv_bits, window=c.layer_windows,
                          slots=layer_cache_tokens(c, capacity, self.prefill_chunk), rope=rope)

    def new_caches(self, n: int, capacity: int, rope: RopeTables | None = None) -> list[ModelCache]:
        """`n` caches as new_cache makes them, for sequences decoded together (step_rows): 16-bit caches without a
        ring are rows of one CachePool, whose decode rows a step attends in one call."""
        c = self.config
        if self.kv_bits == 16 and all(s >= capacity for s in layer_cache_tokens(c, capacity, self.prefill_chunk)) \
                and all(w is None for w in c.layer_windows):
            return CachePool(n, capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.mx_dtype,
                             rope).caches
        return [self.new_cache(capacity, rope) for _ in range(n)]

    def set_rope(self, rope: RopeTables, positions: int) -> None:
        self.model.set_rope(rope.inv_freq, rope.attention_factor, positions)
        self.active_rope = rope

    def _use_rope(self, rope: RopeTables | None, positions: int) -> None:
        """Make the model's RoPE `rope`'s for `positions` (None: keep the one set); cheap when it already is.
        Steps already queued keep the RoPE they were built with (MLX graphs hold their arrays)."""
        if rope is not None and (rope is not self.active_rope or self.model.rope_len() != positions):
            self.set_rope(rope, positions)

    @_on_device
    def prefill(self, ids: list[int], cache: ModelCache, chunk_size: int = 512, *, every: bool = False) -> mx.array:
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._use_rope(cache.rope, cache.capacity)
        check_room(cache, len(ids), self.model.rope_len())
        cache.pending = None
        chunk_size = min(chunk_size, cache.max_chunk)  # a ring cache bounds how many queries one step may write
        rows = []
        for begin in range(0, len(ids), chunk_size):
            chunk = ids[begin:begin + chunk_size]
            out = self.model(mx.array([chunk], dtype=mx.int32), cache.length, cache.layers, last_only=not every)
            cache.length += len(chunk)
            if every:
                rows.append(out[0].astype(mx.float32))
            if begin + chunk_size < len(ids):
                mx.eval(cache.arrays(), *rows)  # run this chunk now: bounds the graph and the attention workspace
        logits = mx.concatenate(rows) if every else out[0, -1].astype(mx.float32)
        mx.async_eval(logits)
        self._latest = (logits, cache)
        return logits

    @_on_device
    def decode(self, token: int, cache: ModelCache) -> mx.array:
        self._use_rope(cache.rope, cache.capacity)
        check_room(cache, 1, self.model.rope_len())
        pending, cache.pending = cache.pending, None
        if pending is not None and pending[:2] == (cache.length, token):
            logits = pending[2]  # queued by sample() while the host handled `token`
        else:
            logits = self.decode_without_advancing(mx.array([[token]], dtype=mx.int32), cache)
        cache.length += 1
        self._latest = (logits, cache)
        return logits

    @_on_device
    def step_rows(self, rows: list[list[int]], caches: list[ModelCache]) -> mx.array:
        """Several sequences in one forward: rows[i] (a prefill piece, or one token to decode) run at positions
        [caches[i].length, …) of caches[i] and are appended to it -> each row's last logits (B, vocab) float32.
        The caches share one RoPE. One row is an ordinary prefill or decode; several run as one packed forward
        (layers.Rows): projections and MLP over all rows at once, RoPE and attention per row."""
        check_rows(rows, caches)
        if len(rows) == 1:
            one = self.decode(rows[0][0], caches[0]) if len(rows[0]) == 1 else self.prefill(rows[0], caches[0],
                                                                                           len(rows[0]))
            self._latest = None  # the single-sequence pipelining (sample) is not for a batch's rows
            return one[None]
        self._use_rope(caches[0].rope, max(c.capacity for c in caches))
        check_rows_fit(rows, caches, self.model.rope_len())
        for cache in caches:
            cache.pending = None
        packed = Rows(caches, [len(r) for r in rows])
        logits = self.model.forward_rows(mx.array([[t for r in rows for t in r]], dtype=mx.int32), packed)
        logits = logits.astype(mx.float32)
        mx.eval(logits, *[a for c in caches for a in c.arrays()])
        for row, cache in zip(rows, caches):
            cache.length += len(row)
        return logits

    @_on_device
    def export_cache(self, cache: ModelCache) -> dict[str, np.ndarray]:
        if cache.slots < cache.capacity:
            raise NotImplementedError("a sliding-window (ring) cache cannot be exported yet")
        n, names = cache.length, list(CACHE_ARRAYS) if self.kv_bits == 8 else ["k", "v"]
        out = {"length": np.array([n], dtype=np.int64)}
        for name in names:
            held = [getattr(layer, CACHE_ARRAYS[name]) for layer in cache.layers]
            if n == 0 or held[0] is None:
                dim = self.config.head_dim if name in ("k", "v") else 1
                dtype = SCALE_DTYPE if name.endswith("scale") else mx.int8 if self.kv_bits == 8 else self.mx_dtype
                stacked = mx.zeros((len(held), self.config.num_key_value_heads, 0, dim), dtype=dtype)
            else:
                stacked = mx.concatenate([a[:, :, :n, :] for a in held])
            out[name] = _to_host(stacked)
        return out

    @_on_device
    def import_cache(self, arrays: dict[str, np.ndarray], capacity: int, rope: RopeTables | None = None) -> ModelCache:
        cache = self.new_cache(capacity, rope)
        c = self.config
        store = mx.int8 if self.kv_bits == 8 else self.mx_dtype
        n = check_cache_arrays(arrays, cache.capacity, cache.slots, c.num_hidden_layers, c.num_key_value_heads,
                               c.head_dim, HOST_STORE[store], self.kv_bits)
        if n:
            stacked = {name: _from_host(arrays[name], SCALE_DTYPE if name.endswith("scale") else store)
                       for name in (CACHE_ARRAYS if self.kv_bits == 8 else ("k", "v"))}
            for i, layer in enumerate(cache.layers):
                layer._grow(min(layer.slots, -(-n // STEP) * STEP))  # as a prefill of n positions grows it
                for name, a in stacked.items():
                    getattr(layer, CACHE_ARRAYS[name])[:, :, :n, :] = a[i:i + 1]
            mx.eval(cache.arrays())
        cache.length = n
        return cache

    def new_rng(self, seed: int | None) -> RandomKey:
        return RandomKey(seed)

    @_on_device
    def sample(self, logits, params: SamplingParams, rng: RandomKey, recent: list[int] = (),
               allowed: np.ndarray | None = None) -> int:
        """The next token, and, for the logits prefill/decode just returned, the next decode step queued.

        MLX evaluates lazily, so the token is first a lazy scalar on the device. When `logits` are the
        latest prefill/decode output, before reading its value this queues (mx.async_eval) the decode
        step that feeds that still-lazy token to the model at position cache.length, and records it in
        `cache.pending`. The device then runs that step while the caller detokenizes and streams the
        token; decode(token, cache) finds it there and returns its logits without waiting for a new
        step. A queued step nobody takes (generation stopped, another token or a truncated cache) is
        dropped: it only wrote at cache.length, where the next write goes.
        """
        latest, self._latest = self._latest, None
        if not isinstance(logits, mx.array):
            logits = mx.array(np.asarray(logits, dtype=np.float32))
        token = sample_lazy(logits, params, rng, recent, allowed)
        cache = latest[1] if latest is not None and latest[0] is logits else None
        if cache is not None:
            self._use_rope(cache.rope, cache.capacity)
            if cache.length < min(cache.capacity, self.model.rope_len()):  # room for the next step
                mx.async_eval(token)
                step = self.decode_without_advancing(token.reshape(1, 1), cache)
                mx.async_eval(step)
                value = int(token.item())
                cache.pending = (cache.length, value, step)
                return value
        return int(token.item())

    @_on_device
    def logits(self, ids: list[int], rope: RopeTables | None = None) -> np.ndarray:
        self._use_rope(rope, len(ids))
        tokens = mx.array([ids], dtype=mx.int32)
        if len(ids) <= self.prefill_chunk:
            return np.array(self.model(tokens, 0, None)[0].astype(mx.float32))
        # long inputs run in chunks through a scratch cache: the same math with a bounded attention workspace
        cache, rows = self.new_cache(len(ids), bits=16), []  # the full forward's keys: never quantized
        for begin in range(0, len(ids), self.prefill_chunk):
            out = self.model(tokens[:, begin:begin + self.prefill_chunk], begin, cache.layers)
            rows.append(np.array(out[0].astype(mx.float32)))
        return np.concatenate(rows)

    def decode_without_advancing(self, token: mx.array, cache: ModelCache) -> mx.array:
        """Logits of one token (1, 1) at position cache.length, written into the cache (length unchanged)."""
        return self.model(token, cache.length, cache.layers)[0, -1].astype(mx.float32)


def _flat(entries: dict[str, dict[str, mx.array]]) -> dict[str, mx.array]:
    """{base: {suffix: array}} back to a state's names, <base>.<suffix>."""
    return {f"{base}.{suffix}": a for base, held in entries.items() for suffix, a in held.items()}


def _to_host(a: mx.array) -> np.ndarray:
    """An array as numpy; bfloat16 as its uint16 bits."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _from_host(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """export_cache's array as `dtype` (uint16 bits back to bfloat16; a float16 array for a float32 cache
    converted). `a` may be read-only (a memory-mapped file): mx.array copies it."""
    if dtype == mx.bfloat16 and a.dtype == np.uint16:
        return mx.array(a).view(mx.bfloat16)
    x = mx.array(a)
    return x if x.dtype == dtype else x.astype(dtype)
