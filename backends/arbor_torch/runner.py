"""TorchModel: a loaded Transformer plus the backend operations arbor's generation loop needs."""

from __future__ import annotations

import functools
import os

import numpy as np
import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from arbor_cli.backend import SamplingParams
from arbor_cli.errors import ContextError, CorruptModelError, OutOfMemoryError
from arbor_cli.planner import kv_cache_tokens
from arbor_cli.rope import RopeTables

from .cache import SCALE_DTYPE, ModelCache
from .memory import memory_info
from .model import Transformer
from .quantize import module_nbytes, one_thread, quantize_model

# Tensors some exporters write that are derived, not learned: safe to skip.
IGNORED_KEYS = ("rotary_emb.inv_freq",)
# CUDA prefill chunks: the largest power of two up to 32K whose MLP transient (intermediate_size x
# chunk, 16-bit) stays within 128 MiB. Measured on an H100 at 128K tokens (docs/performance.md):
# each chunk re-reads the cached prefix, so bigger is faster (135M: 8K chunks 2.79 s, 32K 1.66 s
# on cuDNN) while peak memory grows little (3.43 -> 3.52 GiB); the 1.7B shape gets 8K chunks.
CUDA_PREFILL_CHUNK_MAX = 32768
CUDA_PREFILL_TRANSIENT_BYTES = 128 << 20
CPU_PREFILL_CHUNK = 512
KV_BITS = (8, 16)


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


class TorchModel:
    def __init__(self, model: Transformer, device: str, dtype: str, kv_bits: int = 16, quantize: str | None = None):
        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")
        self.model = model.eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.torch_dtype = model.model.embed_tokens.weight.dtype
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.quantize = quantize
        if quantize is not None:  # weight-only int8 / int4 Linears (quantize.py); what stays float is counted too
            with one_thread():  # memory-bound passes: 1 thread loses nothing and cannot stall on a busy CPU
                quantize_model(model, quantize)
        self.weights_nbytes = module_nbytes(model)
        self.act_element_bytes = self.torch_dtype.itemsize
        # kv_bits 16: the cache in the model's dtype; 8: int8 codes plus a float16 scale per head and token
        self.kv_bits = kv_bits
        self.kv_element_bytes = 1 if kv_bits == 8 else self.torch_dtype.itemsize
        self.kv_scale_bytes = SCALE_DTYPE.itemsize if kv_bits == 8 else 0
        # CUDA: decode replays a captured graph with split-KV attention (ARBOR_CUDA_GRAPHS=0: plain eager path)
        # big chunks keep a GPU's attention kernels fed; small ones bound a CPU's workspace
        self.prefill_chunk = int(os.environ.get("ARBOR_PREFILL_CHUNK", 0)) or (
            cuda_prefill_chunk(model.config.intermediate_size) if torch.device(device).type == "cuda"
            else CPU_PREFILL_CHUNK)
        # the graph's split-KV kernel reads a 16-bit, unwindowed cache: int8 and sliding windows run eager
        self.use_cuda_graphs = (torch.device(device).type == "cuda" and model.config.sliding_window is None
                                and kv_bits == 16 and os.environ.get("ARBOR_CUDA_GRAPHS", "1") != "0")

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str, dtype: str, kv_bits: int = 16,
                        quantize: str | None = None) -> "TorchModel":
        from . import DTYPES

        cfg = checkpoint.config
        with torch.device("meta"):
            model = Transformer(cfg)
        state = {}
        for path in checkpoint.weight_files:
            try:
                state.update(load_file(str(path), device="cpu"))
            except (SafetensorError, OSError) as e:
                raise CorruptModelError(f"{path} is unreadable ({e}); delete the model and pull it again") from None
        state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
            raise CorruptModelError(f"weights in {checkpoint.path} do not match its config.json ({detail}); "
                                    "re-convert or re-download the model")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
                raise CorruptModelError(f"{name} has shape {tuple(tensor.shape)} in {checkpoint.path}, config.json "
                                        f"implies {tuple(model.get_parameter(name).shape)}; re-convert the model")
        target = DTYPES[dtype]
        state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return cls(model, device, dtype, kv_bits, quantize)

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
    def new_cache(self, capacity: int) -> ModelCache:
        c = self.config
        return ModelCache(capacity, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.torch_dtype, self.device,
                          bits=self.kv_bits, window=c.sliding_window,
                          slots=kv_cache_tokens(c, capacity, self.prefill_chunk))

    def set_rope(self, rope: RopeTables, positions: int) -> None:
        self.model.set_rope(torch.from_numpy(rope.inv_freq), rope.attention_factor, positions)

    @_translate_oom
    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: ModelCache, chunk_size: int = 512) -> torch.Tensor:
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check_room(cache, len(ids))
        chunk_size = min(chunk_size, cache.max_chunk)  # a ring cache bounds how many queries one step may write
        logits = None
        for begin in range(0, len(ids), chunk_size):
            chunk = ids[begin:begin + chunk_size]
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)
            last = begin + chunk_size >= len(ids)
            out = self.model(tokens, cache.length, cache.layers, last_only=True)
            cache.length += len(chunk)
            if last:
                logits = out[0, -1].float()
        return logits

    @_translate_oom
    @torch.inference_mode()
    def decode(self, token: int, cache: ModelCache) -> torch.Tensor:
        self._check_room(cache, 1)
        if self.use_cuda_graphs:
            if cache.decoder is None:
                from .cuda_graph import GraphDecoder  # needs Triton: imported on CUDA only

                cache.decoder = GraphDecoder(self.model, cache)
            logits = cache.decoder(token, cache.length)
        else:
            tokens = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(tokens, cache.length, cache.layers)[0, -1].float()
        cache.length += 1
        return logits

    def new_rng(self, seed: int | None) -> torch.Generator:
        rng = torch.Generator(device=self.device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        return rng

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: SamplingParams, rng: torch.Generator, recent: list[int] = ()) -> int:
        if params.repetition_penalty != 1.0 and len(recent):
            seen = torch.tensor(sorted(set(recent)), device=logits.device)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        if params.greedy:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first token always
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=rng))

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(tokens, 0, None)[0].float().cpu().numpy()

    def _check_room(self, cache: ModelCache, n: int) -> None:
        if cache.length + n > cache.capacity:
            raise ContextError(f"the context is full ({cache.capacity} tokens); start a new conversation "
                               "or raise --context")
        if cache.length + n > self.model._rope_len():
            raise ContextError(f"position {cache.length + n} is beyond the RoPE table; set_rope for the context first")
