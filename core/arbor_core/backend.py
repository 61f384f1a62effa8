"""The backend seam: the only module that knows several backends exist.

A backend (a package such as `arbor_torch` or `arbor_mlx`) is a module with the names of
`BackendModule` below: `NAME`, `QUANTIZE_MODES` (the weight quantizations it offers; () for none),
`is_available()`, `default_device()`, `default_dtype(device)`, `memory_info(device)` and

    load(checkpoint, device=None, dtype=None, kv_bits=16, quantize=None) -> LoadedModel

which raises BackendUnavailableError for a device, dtype or `quantize` mode it cannot run (any
`quantize` not in QUANTIZE_MODES). `kv_bits` (8 or 16) is validated once, by arbor_cli.load.
A LoadedModel allocates KV caches, runs prefill and decode, samples on its device, and nothing
else; generation loops, templates and planning live in arbor_cli and work on every backend alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import ContextError
from .rope import RopeTables

REPEAT_WINDOW = 64  # tokens the repetition penalty looks back over (llama.cpp's repeat_last_n)


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages the last REPEAT_WINDOW tokens (HF / llama.cpp semantics)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class LoadedModel(Protocol):
    device: str
    dtype: str
    kv_bits: int  # 16: the KV cache in the model's dtype; 8: int8 codes plus a scale per head and token
    quantize: str | None  # the weight quantization it was loaded with (one of QUANTIZE_MODES), or None
    weights_nbytes: int
    kv_element_bytes: int  # bytes per cached K or V element (1 for an int8 cache)
    kv_scale_bytes: int  # bytes stored beside each head's K or V vector per token (an int8 cache's scale)
    act_element_bytes: int
    prefill_chunk: int  # tokens per prefill step that suit the device
    # whether a position's keys, values and logits come out bit for bit the same whatever the number of
    # rows the step that computed it ran (a chunk of 512, of 30, a decode step of 1): arbor_cli.session's
    # prefix reuse keeps any common prefix where True, only whole prefill chunks where False
    exact_across_row_counts: bool

    def memory(self) -> MemoryInfo: ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> int: ...
    def num_parameters(self) -> int: ...
    def new_cache(self, capacity: int, rope: RopeTables | None = None) -> Any:
        """A cache accepting `capacity` positions; it holds planner.kv_cache_tokens of them (a ring for
        sliding-window models). `cache.length` is how many are valid; `cache.truncate(n)` keeps at most n
        (fewer when a ring no longer holds what position n needs: callers read `length` back).
        `cache.rope` is the RoPE it was built for: prefill and decode run with those tables (for
        `capacity` positions). None: the tables of the latest set_rope."""
    def new_caches(self, n: int, capacity: int, rope: RopeTables | None = None) -> list[Any]:
        """`n` caches as new_cache(capacity, rope) makes them, for sequences decoded together: a backend may lay
        them out so that step_rows reads them at once (torch: rows of one buffer, arbor_torch.cache.CachePool)."""
    def step_rows(self, rows: list[list[int]], caches: list[Any]) -> Any:
        """Several sequences in one forward: rows[i] (a prefill piece, or one token to decode) at positions
        [caches[i].length, …) of caches[i], appended to it -> each row's last logits ([len(rows), vocab]). The
        caches share one `rope`. Each row's logits are its sequence's alone, up to the rounding of matmuls over
        several rows (none where exact_across_row_counts); one row is an ordinary prefill or decode."""
    def set_rope(self, rope: RopeTables, positions: int) -> None:
        """Make `rope` (for positions [0, positions)) the tables that caches without a rope of their own use."""
    def prefill(self, ids: list[int], cache: Any, chunk_size: int, *, every: bool = False) -> Any:
        """Run `ids` at positions [cache.length, …), append them to the cache, return the last position's
        logits ([vocab]); with `every`, every position's ([len(ids), vocab]: a short continuation's, to score it)."""
    def decode(self, token: int, cache: Any) -> Any:
        """Run one token at position cache.length, append it, return its logits."""
    def sample(self, logits: Any, params: SamplingParams, rng: Any, recent: list[int] = (),
               allowed: np.ndarray | None = None) -> int:
        """Pick the next token on the device; `recent` are the ids the repetition penalty applies to;
        `allowed` (bool [n], a JSON schema's mask for this step) limits the pick to its True ids (ids >= n
        are not allowed), for greedy and sampled picks alike."""
    def new_rng(self, seed: int | None) -> Any: ...
    def logits(self, ids: list[int], rope: RopeTables | None = None) -> np.ndarray:
        """Full forward without a cache: float32 [len(ids), vocab]; with `rope` for len(ids) positions
        (None: the tables of the latest set_rope)."""
    def export_cache(self, cache: Any) -> dict[str, np.ndarray]:
        """The cache's positions [0, cache.length) as host arrays, so a document's prefill can be kept on
        disk (arbor_cli/doc_cache.py): the names and layout of `check_cache_arrays`. Not for a ring cache
        (slots < capacity): NotImplementedError."""
    def import_cache(self, arrays: dict[str, np.ndarray], capacity: int, rope: RopeTables | None = None) -> Any:
        """A new cache as new_cache(capacity, rope) makes it, holding the positions export_cache gave
        (cache.length set), converted to the cache's dtype on the way in: a float32 cache's keys and
        values may come as float16 (`KEPT_FLOAT`, as doc_cache keeps them). The arrays may be read-only
        (memory-mapped) and are only read. ValueError for arrays of another model, dtype or kv_bits;
        NotImplementedError when the cache would be a ring (slots < capacity)."""


class BackendModule(Protocol):
    """What arbor_cli reads from a backend package (see the module docstring)."""

    NAME: str
    QUANTIZE_MODES: tuple[str, ...]

    def is_available(self) -> bool: ...
    def default_device(self) -> str: ...
    def default_dtype(self, device: str) -> str: ...
    def memory_info(self, device: str) -> MemoryInfo: ...
    def load(self, checkpoint: Any, device: str | None = None, dtype: str | None = None, kv_bits: int = 16,
             quantize: str | None = None) -> LoadedModel: ...


def check_room(cache: Any, n: int, rope_len: int) -> None:
    """ContextError unless `n` more tokens fit `cache` and the RoPE table (`rope_len` positions) reaches them."""
    if cache.length + n > cache.capacity:
        raise ContextError(f"the context is full ({cache.capacity} tokens); start a new conversation "
                           "or raise --context")
    if cache.length + n > rope_len:
        raise ContextError(f"position {cache.length + n} is beyond the RoPE table; make the cache for that context (Model.new_cache)")


def check_rows(rows: list[list[int]], caches: list[Any]) -> None:
    """ValueError unless `rows` of a batched step (LoadedModel.step_rows) are one non-empty row per cache, every
    cache on one RoPE."""
    if not rows or len(rows) != len(caches) or any(not r for r in rows):
        raise ValueError("step_rows needs one non-empty row per cache")
    if any(c.rope is not caches[0].rope for c in caches):
        raise ValueError("the rows of one step must share their RoPE (caches made for one context)")


def check_rows_fit(rows: list[list[int]], caches: list[Any], rope_len: int) -> None:
    """check_room for each row of a batched step, and no row over what its (ring) cache takes in one step."""
    for row, cache in zip(rows, caches):
        check_room(cache, len(row), rope_len)
        if len(row) > cache.max_chunk:
            raise ValueError(f"a row of {len(row)} tokens is more than its ring cache takes in one step")


def allowed_over(allowed: np.ndarray, vocab: int) -> np.ndarray:
    """`sample`'s `allowed` (bool [n]) as a bool mask over a [vocab] logits row: ids >= n are not allowed,
    and a mask longer than the row is cut to it (what every backend's sampler applies)."""
    keep = np.zeros(vocab, dtype=bool)
    n = min(len(allowed), vocab)
    keep[:n] = allowed[:n]
    return keep


# A float32 cache's keys and values may be kept (and handed to import_cache) in this dtype: 16 bits a value
# halve a kept document (arbor_cli/doc_cache.py; its accuracy against float32 in docs/long-context.md)
KEPT_FLOAT = np.dtype(np.float16)


def kept_forms(store: np.dtype, bits: int) -> tuple[np.dtype, ...]:
    """The dtypes import_cache takes for "k" / "v" of a cache stored as `store`: the store itself, and
    KEPT_FLOAT for a float32 store (16-bit and int8 stores are compact already)."""
    store = np.dtype(store)
    return (store, KEPT_FLOAT) if bits == 16 and store == np.float32 else (store,)


def cache_array_layout(layers: int, kv_heads: int, length: int, head_dim: int, store: np.dtype,
                       bits: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The arrays export_cache returns, name -> (shape, dtype), the same on every backend.

    "k" / "v": (layers, kv_heads, length, head_dim) in the cache's storage dtype (int8 codes for kv_bits
    8; bfloat16, which numpy lacks, as its uint16 bits); "k_scale" / "v_scale" (kv_bits 8): float16
    (layers, kv_heads, length, 1); "length": int64 (1,).
    """
    layout = {"k": ((layers, kv_heads, length, head_dim), np.dtype(store)),
              "v": ((layers, kv_heads, length, head_dim), np.dtype(store)),
              "length": ((1,), np.dtype(np.int64))}
    if bits == 8:
        layout["k_scale"] = layout["v_scale"] = ((layers, kv_heads, length, 1), np.dtype(np.float16))
    return layout


def check_cache_arrays(arrays: dict[str, np.ndarray], capacity: int, slots: int, layers: int, kv_heads: int,
                       head_dim: int, store: np.dtype, bits: int) -> int:
    """The length `arrays` hold, after checking they are export_cache's layout for this cache (ValueError;
    "k" / "v" may be any of `kept_forms`) and fit it; a ring (slots < capacity) is not supported yet
    (NotImplementedError)."""
    if slots < capacity:
        raise NotImplementedError("a sliding-window (ring) cache cannot be exported or imported yet")
    length_array = arrays.get("length")
    if length_array is None or np.asarray(length_array).shape != (1,):
        raise ValueError("the cache arrays have no length")
    length = int(np.asarray(length_array)[0])
    if not 0 <= length <= capacity:
        raise ValueError(f"the cache arrays hold {length} positions; the cache holds {capacity}")
    layout = cache_array_layout(layers, kv_heads, length, head_dim, store, bits)
    if set(arrays) != set(layout):
        raise ValueError(f"the cache arrays are {sorted(arrays)}, expected {sorted(layout)}")
    for name, (shape, dtype) in layout.items():
        a, allowed = arrays[name], kept_forms(dtype, bits) if name in ("k", "v") else (dtype,)
        if tuple(a.shape) != shape or a.dtype not in allowed:
            raise ValueError(f"cache array {name!r} is {a.dtype} {tuple(a.shape)}, expected "
                             f"{' or '.join(map(str, allowed))} {shape}")
    return length
