"""TorchModel: a loaded Transformer plus the backend operations arbor's generation loop needs."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from arbor_core.backend import SamplingParams, check_cache_arrays, check_room, check_rows, check_rows_fit
from arbor_core.errors import CorruptModelError, OutOfMemoryError
from arbor_core.number_input import env_number, env_switch
from arbor_core.planner import layer_cache_tokens
from arbor_core.rope import RopeTables
from arbor_weights.checkpoint import check_tensors

from . import compiled_decode, sampling
from .arch import family
from .cache import SCALE_DTYPE, CachePool, ModelCache
from .memory import memory_info, release_freed_heap
from .model import Rows, Transformer
from .quantize import module_nbytes, one_thread, quantize_model

# CUDA prefill chunks: the largest power of two up to 32K whose MLP transient (intermediate_size x
# chunk, 16-bit) stays within 128 MiB. Each chunk re-reads the cached prefix, so bigger is faster
# while peak memory grows little (docs/performance.md, "Prefill chunk size").
CUDA_PREFILL_CHUNK_MAX = 32768
CUDA_PREFILL_TRANSIENT_BYTES = 128 << 20
CPU_PREFILL_CHUNK = 512
# a cached K/V element on the host (export_cache): bfloat16, which numpy lacks, travels as its 16 bits
HOST_STORE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.int8: np.int8}


def cuda_prefill_chunk(intermediate_size: int) -> int:
    chunk = CUDA_PREFILL_CHUNK_MAX
    while chunk > 1024 and intermediate_size * chunk * 2 > CUDA_PREFILL_TRANSIENT_BYTES:
        chunk //= 2
    return chunk


def _translate_oom(fn):
    """Out-of-memory from any device becomes arbor's OutOfMemoryError, so callers can retry smaller."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise OutOfMemoryError(f"out of memory ({str(e).splitlines()[0][:120]})") from None
    return wrapper


def read_state(checkpoint, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (memory-mapped), checked against the model's names and shapes (`expected`)."""
    state = {}
    for path in checkpoint.weight_files:
        try:
            state.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CorruptModelError(f"{path} is unreadable ({e}); delete the model and pull it again") from None
    return check_tensors(state, expected, checkpoint.path, checkpoint.config.tie_word_embeddings)


class TorchModel:
    def __init__(self, model: Transformer, device: str, dtype: str, kv_bits: int = 16, quantize: str | None = None,
                 *, parameter_count: int | None = None):
        """`quantize`: the weight format to run; float layers are quantized here, while a model whose layers
        arrive quantized already (built from a checkpoint's blocks: `parameter_count` then says how many
        weights it had as floats) is taken as it is."""
        self.model = model.eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.torch_dtype = model.model.embed_tokens.weight.dtype
        self.parameter_count = parameter_count or sum(p.numel() for p in model.parameters())
        self.quantize = quantize
        # the graph's split-KV kernel reads every cache layout: 16-bit or int8, whole or a sliding layer's ring; the
        # family says whether its attention is one the kernel computes (arch/: decode_strategies)
        self.use_cuda_graphs = (torch.device(device).type == "cuda" and env_switch("ARBOR_CUDA_GRAPHS", True)
                                and "cuda_graph" in family(model.config).decode_strategies(model.config))
        if quantize is not None and parameter_count is None:  # float layers -> weight-only int8 / int4 (quantize.py)
            with one_thread():  # memory-bound passes: 1 thread loses nothing and cannot stall on a busy CPU
                quantize_model(model, quantize)  # fuses each block's projections (model.fuse_layer), then quantizes
        elif self.use_cuda_graphs:
            model.fuse_projections()  # the graph multiplies by the fused q/k/v and gate/up weights
        self.weights_nbytes = module_nbytes(model)
        self.act_element_bytes = self.torch_dtype.itemsize
        # kv_bits 16: the cache in the model's dtype; 8: int8 codes plus a float16 scale per head and token
        self.kv_bits = kv_bits
        self.kv_element_bytes = 1 if kv_bits == 8 else self.torch_dtype.itemsize
        self.kv_scale_bytes = SCALE_DTYPE.itemsize if kv_bits == 8 else 0
        # CUDA: decode replays a captured graph with split-KV attention (ARBOR_CUDA_GRAPHS=0: plain eager path)
        # big chunks keep a GPU's attention kernels fed; small ones bound a CPU's workspace
        self.prefill_chunk = env_number("ARBOR_PREFILL_CHUNK", 0) or (
            cuda_prefill_chunk(model.config.intermediate_size) if torch.device(device).type == "cuda"
            else CPU_PREFILL_CHUNK)
        # measured (40 tokens as 40 rows vs 30 + 10 vs 39 + a decode step): on the CPU (135M model) float32
        # logits differ by 2e-5, int8 by 0.2, int4 by 0.25; on an H100 (its shape, 4 random layers) bf16 by
        # 0.4-1.3 and float32 by 1e-4, with CUDA graphs or without
        self.exact_across_row_counts = False
        self.active_rope: RopeTables | None = None  # the RopeTables the model's cos/sin tables were built from
        # CPU, quantized weights: decode runs one AOT-compiled step, built once per machine (compiled_decode.py).
        # The float path stays eager (it is the exact reference), and so do int8 caches and the families the
        # compiled step does not run (arch/: decode_strategies).
        self.compiled = None
        if (torch.device(device).type == "cpu" and quantize is not None and kv_bits == 16
                and "compiled_cpu" in family(model.config).decode_strategies(model.config) and compiled_decode.enabled()):
            self.compiled = compiled_decode.CompiledDecode(model)

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str, dtype: str, kv_bits: int = 16,
                        quantize: str | None = None) -> "TorchModel":
        from . import DTYPES, layout_cache, load_quantized

        cfg = checkpoint.config
        with torch.device("meta"):
            model = Transformer(cfg)
        target = DTYPES[dtype]
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        # read at most once: by the layout cache when it finds no blocks to build from, then here for the float path
        read = functools.cache(lambda: read_state(checkpoint, expected))
        if quantize == "int4":
            # GGUF 4-bit blocks are the int4 kernel's codes already: built from them, no float copy of the model,
            # once per machine (layout_cache.py); later processes map the built tensors from the cache
            parameter_count = sum(p.numel() for p in model.parameters())
            built = layout_cache.int4_model(model, checkpoint, target, read)
            if built is not None:
                read.cache_clear()  # the blocks it was built from (if read) are not held while the model runs
                lm = cls(built, device, dtype, kv_bits, quantize, parameter_count=parameter_count)
                release_freed_heap()
                return lm._from(checkpoint)
        state = read()
        read.cache_clear()  # from here `state` is the only reference: `del state` below must free it
        state = load_quantized.dequantized_state(state, checkpoint.path)  # exact float32 for GGUF blocks
        state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        del state  # the model holds the tensors now; fusing or quantizing them must free what they replace
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        lm = cls(model, device, dtype, kv_bits, quantize)
        if torch.device(device).type == "cpu":
            release_freed_heap()
        return lm._from(checkpoint)

    def _from(self, checkpoint) -> "TorchModel":
        """Record where the model came from: a background build of its compiled decode step loads it from there."""
        if self.compiled is not None:
            # imported here, not with the package: `python -m arbor_torch.background_compile` must find it unimported
            from .background_compile import BuildSource

            self.compiled.source = BuildSource(str(checkpoint.path), self.dtype, self.quantize)
        return self

    # ---- the backend protocol -----------------------------------------------------------
    def memory(self):
        return memory_info(self.device)

    def reset_peak_memory(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        """Peak bytes allocated on the device since reset_peak_memory (CPU: the process's resident size)."""
        if torch.device(self.device).type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(psutil.Process().memory_info().rss)

    def num_parameters(self) -> int:
        return self.parameter_count  # as loaded: quantized weights are buffers, not parameters

    @_translate_oom
    def new_cache(self, capacity: int, rope: RopeTables | None = None) -> ModelCache:
        c = self.config
        return ModelCache(capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.torch_dtype, self.device,
                          bits=self.kv_bits, window=c.layer_windows,
                          slots=layer_cache_tokens(c, capacity, self.prefill_chunk), rope=rope)

    @_translate_oom
    def new_caches(self, n: int, capacity: int, rope: RopeTables | None = None) -> list[ModelCache]:
        """`n` caches as new_cache makes them, for sequences decoded together (step_rows): 16-bit caches without
        a ring are the rows of one CachePool, whose one-token rows a step attends in one call."""
        c = self.config
        if self.kv_bits == 16 and all(s >= capacity for s in layer_cache_tokens(c, capacity, self.prefill_chunk)) \
                and all(w is None for w in c.layer_windows):
            return CachePool(n, capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.torch_dtype,
                             self.device, rope).caches
        return [self.new_cache(capacity, rope) for _ in range(n)]

    def set_rope(self, rope: RopeTables, positions: int) -> None:
        self.model.set_rope(torch.from_numpy(rope.inv_freq), rope.attention_factor, positions)
        self.active_rope = rope

    def _use_rope(self, rope: RopeTables | None, positions: int) -> None:
        """Make the model's cos/sin tables `rope`'s for `positions` (None: keep the tables set).

        Cheap when they already are. Same-sized tables are rewritten in place, so a captured CUDA
        graph keeps reading the current ones (cuda_graph.py recaptures when their buffer changes).
        """
        if rope is not None and (rope is not self.active_rope or self.model._rope_len() != positions):
            self.set_rope(rope, positions)

    @_translate_oom
    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: ModelCache, chunk_size: int = 512, *, every: bool = False) -> torch.Tensor:
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._use_rope(cache.rope, cache.capacity)
        check_room(cache, len(ids), self.model._rope_len())
        chunk_size = min(chunk_size, cache.max_chunk)  # a ring cache bounds how many queries one step may write
        rows = []
        for begin in range(0, len(ids), chunk_size):
            chunk = ids[begin:begin + chunk_size]
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)
            last = begin + chunk_size >= len(ids)
            out = self.model(tokens, cache.length, cache.layers, last_only=not every)
            cache.length += len(chunk)
            if every:
                rows.append(out[0].float())
            elif last:
                rows.append(out[0, -1].float())
        return torch.cat(rows) if every else rows[0]

    @_translate_oom
    @torch.inference_mode()
    def decode(self, token: int, cache: ModelCache) -> torch.Tensor:
        self._use_rope(cache.rope, cache.capacity)
        check_room(cache, 1, self.model._rope_len())
        logits = None
        if self.use_cuda_graphs:
            if cache.decoder is None:
                from .cuda_graph import GraphDecoder  # needs Triton: imported on CUDA only

                cache.decoder = GraphDecoder(self.model, cache)
            logits = cache.decoder(token, cache.length)
        elif self.compiled is not None and cache.stacked_k is not None:
            logits = self.compiled.step(token, cache)  # None: the compiled step is unavailable, run eager
        if logits is None:
            tokens = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(tokens, cache.length, cache.layers)[0, -1].float()
        cache.length += 1
        return logits

    @_translate_oom
    @torch.inference_mode()
    def step_rows(self, rows: list[list[int]], caches: list[ModelCache]) -> torch.Tensor:
        """Several sequences in one forward: rows[i] (a prefill piece, or one token to decode) run at positions
        [caches[i].length, …) of caches[i] and are appended to it -> each row's last logits (B, vocab) float32.
        The caches share one RoPE (the same `rope` object, or none). One row is an ordinary prefill or decode
        (the compiled CPU step or the CUDA graph); several run eager, the rows' projections and MLP as one
        matmul, attention per row (model.Rows): the compiled and graph steps are batch-1."""
        check_rows(rows, caches)
        if len(rows) == 1:
            one = self.decode(rows[0][0], caches[0]) if len(rows[0]) == 1 else self.prefill(rows[0], caches[0],
                                                                                           len(rows[0]))
            return one.unsqueeze(0)
        self._use_rope(caches[0].rope, max(c.capacity for c in caches))
        check_rows_fit(rows, caches, self.model._rope_len())
        packed = Rows(caches, [len(r) for r in rows], self.device)
        tokens = torch.tensor([[t for r in rows for t in r]], dtype=torch.long, device=self.device)
        logits = self.model.forward_rows(tokens, packed).float()
        for row, cache in zip(rows, caches):
            cache.length += len(row)
        return logits

    def _store_dtype(self) -> torch.dtype:
        return torch.int8 if self.kv_bits == 8 else self.torch_dtype

    def _check_arrays(self, arrays: dict[str, np.ndarray], cache: ModelCache) -> int:
        c = self.config
        return check_cache_arrays(arrays, cache.capacity, cache.slots, c.num_hidden_layers, c.num_key_value_heads,
                                  c.head_dim, HOST_STORE[self._store_dtype()], self.kv_bits)

    @torch.inference_mode()
    def export_cache(self, cache: ModelCache) -> dict[str, np.ndarray]:
        if cache.slots < cache.capacity:
            raise NotImplementedError("a sliding-window (ring) cache cannot be exported yet")
        n, names = cache.length, ("k", "v", "k_scale", "v_scale")
        out = {"length": np.array([n], dtype=np.int64)}
        for name in names if self.kv_bits == 8 else names[:2]:
            stacked = torch.cat([getattr(layer, name)[:, :, :n] for layer in cache.layers])  # a copy, on the device
            out[name] = _to_host(stacked.cpu())
        return out

    @_translate_oom
    @torch.inference_mode()
    def import_cache(self, arrays: dict[str, np.ndarray], capacity: int, rope: RopeTables | None = None) -> ModelCache:
        cache = self.new_cache(capacity, rope)
        n = self._check_arrays(arrays, cache)
        names = ("k", "v", "k_scale", "v_scale") if self.kv_bits == 8 else ("k", "v")
        for name in names:
            stacked = _from_host(arrays[name], getattr(cache.layers[0], name).dtype, self.device)
            whole = getattr(cache, f"stacked_{name}", None)  # the layers' one buffer (16-bit): one copy
            if whole is not None:
                whole[:, :, :n] = stacked
                continue
            for i, layer in enumerate(cache.layers):
                getattr(layer, name)[:, :, :n] = stacked[i:i + 1]
        cache.length = n
        return cache

    def new_rng(self, seed: int | None) -> torch.Generator:
        return sampling.new_rng(self.device, seed)

    def sample(self, logits: torch.Tensor, params: SamplingParams, rng: torch.Generator, recent: list[int] = (),
               allowed: np.ndarray | None = None) -> int:
        return sampling.sample(logits, params, rng, recent, allowed)

    @torch.inference_mode()
    def logits(self, ids: list[int], rope: RopeTables | None = None) -> np.ndarray:
        self._use_rope(rope, len(ids))
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(tokens, 0, None)[0].float().cpu().numpy()


def _to_host(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy; bfloat16 as its uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_host(a: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """export_cache's array as a tensor on `device`, to be copied into a cache of `dtype` (uint16 bits back to
    bfloat16; a float16 array for a float32 cache is converted by that copy). `a` may be read-only (a
    memory-mapped file): it is only read, so torch's warning about writing to it does not apply."""
    a = np.ascontiguousarray(a)
    if dtype == torch.bfloat16 and a.dtype == np.uint16:
        a = a.view(np.int16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return (t.view(torch.bfloat16) if a.dtype == np.int16 and dtype == torch.bfloat16 else t).to(device)
