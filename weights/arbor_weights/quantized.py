"""GGUF block-quantized weights kept quantized in an Arbor checkpoint (numpy only: both backends read it).

Why: a GGUF is already the weights the model runs with; dequantizing it to float32 at import made the
default model's checkpoint 5.5x its GGUF (517 MB for 94 MB) and bought nothing, since its values are
exactly d * q + m. So a 2-D tensor of type Q4_0, Q4_1 or Q8_0 (input dim K a multiple of 32) is stored
as its codes and block constants, under the HF name's base (the name minus ".weight"):

    4-bit (Q4_0, Q4_1)  <base>.qweight  uint8   [N, K/2]   byte j of a row: column 2j in the low nibble,
                                                           column 2j+1 in the high one
                        <base>.scales   float16 [N, K/32]  the block's d
                        <base>.biases   float16 [N, K/32]  the block's m (Q4_1 only)
                        w = d * q + m (Q4_1), w = d * (q - 8) (Q4_0), q in 0..15
    8-bit (Q8_0)        <base>.qweight  int8    [N, K]
                        <base>.scales   float16 [N, K/32]
                        w = d * q

ggml orders a Q4 block's nibbles differently (qs[j] & 15 is element j, qs[j] >> 4 element j + 16);
from_gguf_blocks converts. Every other tensor (norms, F16/BF16, K-quants, …) is stored as float32.
config.json records {"quantization": {"format": "gguf-blocks", "group_size": 32, "tensors": {kind: n}}}.

dequantize() is bit-identical to gguf.quants.dequantize: the same float32 operations in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from arbor_core.errors import CorruptModelError

from .safetensors_file import read_safetensors_header

FORMAT = "gguf-blocks"
GROUP_SIZE = 32
KINDS = ("Q4_0", "Q4_1", "Q8_0")  # the GGUF types kept as codes; gguf.GGMLQuantizationType names
SUFFIXES = ("qweight", "scales", "biases")
_Q4_DATA = {"Q4_0": 2, "Q4_1": 4}  # byte offset of qs in a ggml block (after d, and m for Q4_1)
# Every byte's two codes as a pair of float32 (low nibble first), read as one 8-byte word: a single
# np.take of words unpacks a whole matrix (6x faster than indexing float pairs).
_NIBBLE_PAIRS = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.float32).view(np.uint64)[:, 0]


def keeps_quantized(kind: str, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor of `kind` and HF `shape` (rows, columns) is stored as codes."""
    return kind in KINDS and len(shape) == 2 and shape[1] % GROUP_SIZE == 0


def entry_layout(kind: str, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, int], str]]:
    """suffix -> (shape, numpy dtype) of the entries one [N, K] tensor of `kind` is stored as."""
    n, k = shape
    groups = (n, k // GROUP_SIZE)
    if kind == "Q8_0":
        return {"qweight": ((n, k), "int8"), "scales": (groups, "float16")}
    layout = {"qweight": ((n, k // 2), "uint8"), "scales": (groups, "float16")}
    if kind == "Q4_1":
        layout["biases"] = (groups, "float16")
    return layout


def from_gguf_blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A GGUF tensor's raw blocks (uint8, one row of blocks per output row) as {suffix: array}."""
    n, k = shape
    blocks = np.asarray(data).view(np.uint8).reshape(n, k // GROUP_SIZE, -1)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if kind == "Q8_0":
        return {"qweight": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k), "scales": scales}
    start = _Q4_DATA[kind]
    qs = blocks[..., start:start + GROUP_SIZE // 2]  # [N, K/32, 16]: element j low, element j + 16 high
    even, odd = qs[..., 0::2], qs[..., 1::2]
    # our byte i holds columns 2i, 2i+1: the low nibbles of qs[2i], qs[2i+1] (i < 8), else their high ones
    packed = np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)
    out = {"qweight": packed.reshape(n, k // 2), "scales": scales}
    if kind == "Q4_1":
        out["biases"] = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    return out


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [N, K] (0..15) -> uint8 [N, K/2], column 2j in the low nibble of byte j."""
    codes = np.asarray(codes, dtype=np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> the 4-bit codes [N, K] as uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def kind_of(entries: Mapping[str, Any], where: str = "the checkpoint") -> str:
    """"Q4_0", "Q4_1" or "Q8_0" from the entries' dtypes and shapes; CorruptModelError for anything else."""
    qweight, scales, biases = (entries.get(s) for s in SUFFIXES)
    if qweight is None or scales is None or qweight.ndim != 2 or scales.ndim != 2:
        raise CorruptModelError(f"{where} holds a quantized tensor without 2-D qweight and scales; "
                                "re-convert the model")
    kind = "Q4_1" if biases is not None else "Q8_0" if qweight.dtype == np.int8 else "Q4_0"
    columns = qweight.shape[1] * (1 if kind == "Q8_0" else 2)
    expected = entry_layout(kind, (qweight.shape[0], columns))
    for suffix, (shape, dtype) in expected.items():
        if entries[suffix].dtype != np.dtype(dtype) or tuple(entries[suffix].shape) != shape:
            raise CorruptModelError(f"{where}: quantized {suffix} is {entries[suffix].dtype} "
                                    f"{tuple(entries[suffix].shape)}, a {kind} tensor needs {dtype} {shape}; "
                                    "re-convert the model")
    return kind


def dequantize(entries: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [N, K] from one tensor's entries, bit-identical to gguf.quants.dequantize."""
    kind = kind_of(entries)
    qweight = np.asarray(entries["qweight"])
    n = qweight.shape[0]
    d = np.asarray(entries["scales"]).astype(np.float32)[..., None]  # [N, K/32, 1]
    if kind == "Q8_0":
        values = qweight.reshape(n, -1, GROUP_SIZE).astype(np.float32)
        values *= d
    else:
        values = np.take(_NIBBLE_PAIRS, qweight).view(np.float32).reshape(n, -1, GROUP_SIZE)  # q, column order
        if kind == "Q4_0":
            values -= np.float32(8)  # exact, as gguf's integer q - 8 is
        values *= d
        if kind == "Q4_1":
            values += np.asarray(entries["biases"]).astype(np.float32)[..., None]
    return values.reshape(n, -1)


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(float tensors by name, quantized tensors as {base: {suffix: array}}) of a loaded state."""
    floats, quantized = {}, {}
    for name, tensor in state.items():
        base, _, suffix = name.rpartition(".")
        if suffix in SUFFIXES:
            quantized.setdefault(base, {})[suffix] = tensor
        else:
            floats[name] = tensor
    return floats, quantized


def dequantize_state(state: Mapping[str, Any], where: str = "the checkpoint") -> dict[str, np.ndarray]:
    """A state with every quantized tensor replaced by its float32 `<base>.weight` (others as they are).

    Entries may be any arrays numpy can view (numpy, MLX); torch tensors go through .numpy() first."""
    floats, quantized = split_state(state)
    for base, entries in quantized.items():
        entries = {suffix: np.asarray(a) for suffix, a in entries.items()}
        kind_of(entries, where)
        floats[f"{base}.weight"] = dequantize(entries)
    return floats


def quantization_record(counts: Mapping[str, int]) -> dict[str, Any] | None:
    """config.json's "quantization" entry for an import that kept `counts` tensors per kind (None: none)."""
    if not counts:
        return None
    return {"format": FORMAT, "group_size": GROUP_SIZE, "tensors": dict(sorted(counts.items()))}


def layer_bits(checkpoint) -> int | None:
    """The predominant format of the layers' Linear weights: 4, 8, or None for float ones.

    Read from the safetensors headers (microseconds), counting model.layers.* projections only: the
    embedding and head are often stored at a higher precision than the layers."""
    if checkpoint.quantization is None:
        return None
    votes = {4: 0, 8: 0, None: 0}
    for file in checkpoint.weight_files:
        for name, info in read_safetensors_header(file).items():
            if not name.startswith("model.layers."):
                continue
            if name.endswith(".qweight"):
                votes[8 if info["dtype"] == "I8" else 4] += 1
            elif name.endswith(".weight") and len(info["shape"]) == 2:
                votes[None] += 1
    return max(votes, key=lambda bits: votes[bits])
