"""GGUF block-quantized weights kept quantized in an Arbor checkpoint (numpy only: both backends read it).

Why: a GGUF is already the weights the model runs with; dequantizing it to float32 at import made the
default model's checkpoint 5.5x its GGUF (517 MB for 94 MB), and a Q4_K_M 1.5B model's 6.0x, and bought
nothing, since its values are exactly a few integers times block constants. So a 2-D tensor of one of
KINDS (input dim K a multiple of its block) is stored as its codes and block constants, under the HF
name's base (the name minus ".weight"):

    Q4_0, Q4_1          <base>.qweight       uint8   [N, K/2]   byte j of a row: column 2j in the low nibble,
                                                                column 2j+1 in the high one; q in 0..15
                        <base>.scales        float16 [N, K/32]  the block's d
                        <base>.biases        float16 [N, K/32]  the block's m (Q4_1 only)
                        w = d * q + m (Q4_1), w = d * (q - 8) (Q4_0)
    Q8_0, Q5_0          <base>.qweight       int8    [N, K]     q (Q8_0), q - 16 (Q5_0's 5-bit q)
                        <base>.scales        float16 [N, K/32]
                        w = d * q: Q5_0's d * (q - 16) is the same float32 product, so Q5_0 is stored
                        as Q8_0 (kind_of says "Q8_0"; 8 bits for 5, losslessly)
    Q4_K                <base>.qweight       uint8   [N, K/2]   as Q4_0's, q in 0..15
                        <base>.super_scales  float16 [N, K/256, 2]  the super-block's d and dmin
                        <base>.sub_scales    uint8   [N, K/32, 2]   each 32's 6-bit scale sc and min m
                        w = (d * sc) * q - (dmin * m)
    Q5_K                <base>.qweight       int8    [N, K]     q in 0..31; super_scales, sub_scales as Q4_K's
    Q6_K                <base>.qweight       int8    [N, K]     q - 32 (-32..31)
                        <base>.super_scales  float16 [N, K/256, 1]  d
                        <base>.sub_scales    int8    [N, K/16]      each 16's scale sc
                        w = (d * sc) * q

The kind is read back from which entries exist and their dtypes (kind_of), so no per-tensor record is
needed. Stored sizes against the file's: Q4_K 4.625 bits a weight (the file's 4.5), Q5_0 8.5 (5.5), Q5_K
and Q6_K 8.625 / 8.5625 (5.5 / 6.5625): a Q4_K_M model's checkpoint is ~1.1x its GGUF.
ggml orders its codes differently (a Q4 block's qs[j] & 15 is element j, qs[j] >> 4 element j + 16; the
K-quants interleave 32- or 64-byte runs); from_gguf_blocks converts. Every other tensor (norms,
F16/BF16, Q5_1, Q2_K, Q3_K) is stored as float32 (gguf_import.py refuses the types it cannot keep either way).
config.json records {"quantization": {"format": "gguf-blocks", "group_size": 32, "tensors": {gguf kind: n}}}.

dequantize() is bit-identical to gguf.quants.dequantize: the same float32 operations in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

from arbor_core.errors import CorruptModelError

from .safetensors_file import read_safetensors_header

FORMAT = "gguf-blocks"
GROUP_SIZE = 32
SUPER_BLOCK = 256  # inputs of a K-quant super-block
# the GGUF types kept as codes (gguf.GGMLQuantizationType names) -> (inputs, bytes) of one ggml block
BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q5_0": (32, 22),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
KINDS = tuple(BLOCK_BYTES)
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
STORED_AS = {"Q5_0": "Q8_0"}  # a GGUF type stored in another's layout (the module docstring says why)
SUFFIXES = ("qweight", "scales", "biases", "super_scales", "sub_scales")
_Q4_DATA = {"Q4_0": 2, "Q4_1": 4}  # byte offset of qs in a ggml block (after d, and m for Q4_1)
# Every byte's two codes as a pair of float32 (low nibble first), read as one 8-byte word: a single
# np.take of words unpacks a whole matrix (6x faster than indexing float pairs).
_NIBBLE_PAIRS = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.float32).view(np.uint64)[:, 0]


def keeps_quantized(kind: str, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor of `kind` and HF `shape` (rows, columns) is stored as codes."""
    return kind in KINDS and len(shape) == 2 and shape[1] % BLOCK_BYTES[kind][0] == 0


def entry_layout(kind: str, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """suffix -> (shape, numpy dtype) of the entries one [N, K] tensor of `kind` is stored as."""
    kind = STORED_AS.get(kind, kind)
    n, k = shape
    four_bit = kind in ("Q4_0", "Q4_1", "Q4_K")
    layout = {"qweight": ((n, k // 2), "uint8") if four_bit else ((n, k), "int8")}
    if kind == "Q6_K":
        return {**layout, "super_scales": ((n, k // SUPER_BLOCK, 1), "float16"), "sub_scales": ((n, k // 16), "int8")}
    if kind in K_QUANTS:
        return {**layout, "super_scales": ((n, k // SUPER_BLOCK, 2), "float16"),
                "sub_scales": ((n, k // GROUP_SIZE, 2), "uint8")}
    layout["scales"] = ((n, k // GROUP_SIZE), "float16")
    if kind == "Q4_1":
        layout["biases"] = ((n, k // GROUP_SIZE), "float16")
    return layout


# ---- ggml's blocks -> our entries ------------------------------------------------------------------

def from_gguf_blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A GGUF tensor's raw blocks (uint8, one row of blocks per output row) as {suffix: array}."""
    n, k = shape
    block, size = BLOCK_BYTES[kind]
    blocks = np.asarray(data).view(np.uint8).reshape(n, k // block, size)
    return _READERS[kind](blocks, kind, n, k)


def _halves(blocks: np.ndarray, start: int, count: int = 1) -> np.ndarray:
    """`count` float16 from byte `start` of every block: [N, blocks, count]."""
    return np.ascontiguousarray(blocks[..., start:start + 2 * count]).view(np.float16)


def _q8_0(blocks, kind, n, k):
    return {"qweight": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k),
            "scales": _halves(blocks, 0)[..., 0]}


def _q4(blocks, kind, n, k):
    start = _Q4_DATA[kind]
    qs = blocks[..., start:start + GROUP_SIZE // 2]  # [N, K/32, 16]: element j low, element j + 16 high
    even, odd = qs[..., 0::2], qs[..., 1::2]
    # our byte i holds columns 2i, 2i+1: the low nibbles of qs[2i], qs[2i+1] (i < 8), else their high ones
    packed = np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)
    out = {"qweight": packed.reshape(n, k // 2), "scales": _halves(blocks, 0)[..., 0]}
    if kind == "Q4_1":
        out["biases"] = _halves(blocks, 2)[..., 0]
    return out


def _q5_0(blocks, kind, n, k):
    """d, then qh (element j's fifth bit is bit j of a little-endian uint32), then Q4_0's 16 bytes of nibbles."""
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # [N, K/32, 32], one byte a bit
    qs = blocks[..., 6:22]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (high << 4)  # 0..31
    return {"qweight": (codes.astype(np.int8) - np.int8(16)).reshape(n, k), "scales": _halves(blocks, 0)[..., 0]}


def _k_sub_scales(packed: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks -> uint8 [..., 8, 2]. Bytes 0-3
    and 4-7 hold sub-blocks 0-3's scales and mins in their low 6 bits; sub-blocks 4-7 take bytes 8-11's low
    (scale) and high (min) nibble, topped by the 2 high bits of bytes 0-3 (scale) and 4-7 (min)."""
    scales, mins, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([scales & 63, (rest & 15) | ((scales >> 6) << 4)], axis=-1)
    m = np.concatenate([mins & 63, (rest >> 4) | ((mins >> 6) << 4)], axis=-1)
    return np.stack([sc, m], axis=-1)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes of a Q4_K / Q5_K super-block -> its 256 low 4 bits in order: byte run c (32 bytes) holds
    sub-block 2c in its low nibbles and sub-block 2c + 1 in its high ones. [..., 256] uint8."""
    runs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=-2).reshape(*qs.shape[:-1], SUPER_BLOCK)


def _q45_k(blocks, kind, n, k):
    """d, dmin, 12 bytes of sub-block scales, (Q5_K: 32 bytes of fifth bits, bit s of byte i for element i of
    sub-block s,) then 128 bytes of low nibbles."""
    scales = {"super_scales": _halves(blocks, 0, 2), "sub_scales": _k_sub_scales(blocks[..., 4:16]).reshape(n, -1, 2)}
    if kind == "Q4_K":
        return {"qweight": pack_nibbles(_k_low_nibbles(blocks[..., 16:144]).reshape(n, k)), **scales}
    high = (blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [N, B, element, sub-block]
    codes = _k_low_nibbles(blocks[..., 48:176]) | (high.swapaxes(-1, -2).reshape(n, -1, SUPER_BLOCK) << 4)
    return {"qweight": codes.astype(np.int8).reshape(n, k), **scales}


def _q6_k(blocks, kind, n, k):
    """128 bytes of low nibbles (per half of 128: byte b's low nibble is element b, its high one b + 64), 64
    bytes of high 2-bit pairs (per half: bits 2s of byte j are element 32s + j), 16 int8 scales, d."""
    halves = blocks[..., 0:128].reshape(n, -1, 2, 1, 64)
    low = np.concatenate([halves & 0x0F, halves >> 4], axis=-2).reshape(n, -1, SUPER_BLOCK)
    pairs = blocks[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    codes = low | ((pairs & 3).reshape(n, -1, SUPER_BLOCK) << 4)
    return {"qweight": (codes.astype(np.int8) - np.int8(32)).reshape(n, k), "super_scales": _halves(blocks, 208),
            "sub_scales": np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).reshape(n, -1)}


_READERS = {"Q4_0": _q4, "Q4_1": _q4, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q45_k, "Q5_K": _q45_k, "Q6_K": _q6_k}


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [N, K] (0..15) -> uint8 [N, K/2], column 2j in the low nibble of byte j."""
    codes = np.asarray(codes, dtype=np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> the 4-bit codes [N, K] as uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


# ---- our entries: their kind, checked, and their float32 values ------------------------------------

def _dtype_name(array: Any) -> str:
    """'uint8' for numpy's uint8, torch.uint8 and mlx.core.uint8 alike."""
    return str(array.dtype).rsplit(".", 1)[-1]


def _stored_kind(entries: Mapping[str, Any], bits: int) -> str:
    if "super_scales" in entries:
        sub = entries.get("sub_scales")
        return "Q4_K" if bits == 4 else "Q6_K" if sub is not None and _dtype_name(sub) == "int8" else "Q5_K"
    return ("Q4_1" if "biases" in entries else "Q4_0") if bits == 4 else "Q8_0"


def stored_layout(entries: Mapping[str, Any], fail: Callable[[str], NoReturn]) -> tuple[str, tuple[int, int]]:
    """(kind, the [N, K] float shape) of one tensor's entries (numpy, torch or MLX arrays), every entry's
    dtype and shape checked against entry_layout; `fail(detail)` raises for anything else."""
    qweight = entries.get("qweight")
    if qweight is None or not {"scales", "super_scales"} & entries.keys() or len(qweight.shape) != 2:
        fail("lacks a 2-D qweight or its scales")
    bits = {"uint8": 4, "int8": 8}.get(_dtype_name(qweight))
    if bits is None:
        fail(f"has a {_dtype_name(qweight)} qweight (uint8 or int8 expected)")
    kind = _stored_kind(entries, bits)
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    wanted = entry_layout(kind, (n, k))
    if entries.keys() != wanted.keys():
        fail(f"holds {sorted(entries)}, a {bits}-bit weight {sorted(wanted)}")
    for suffix, (shape, dtype) in wanted.items():
        have = (_dtype_name(entries[suffix]), tuple(entries[suffix].shape))
        if suffix != "qweight" and have != (dtype, shape):
            fail(f"has {suffix} {have[0]} {have[1]}, its qweight implies {dtype} {shape}")
    if k % BLOCK_BYTES[kind][0]:
        fail(f"has {k} columns, not a multiple of {BLOCK_BYTES[kind][0]}")
    return kind, (n, k)


def kind_of(entries: Mapping[str, Any], where: str = "the checkpoint") -> str:
    """"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K" or "Q6_K" (a Q5_0 tensor is stored as Q8_0) from the
    entries' dtypes and shapes; CorruptModelError for anything else."""
    def fail(detail: str) -> NoReturn:
        raise CorruptModelError(f"{where}: a quantized tensor {detail}; re-convert the model")

    return stored_layout(entries, fail)[0]


def dequantize(entries: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [N, K] from one tensor's entries, bit-identical to gguf.quants.dequantize."""
    kind = kind_of(entries)
    qweight = np.asarray(entries["qweight"])
    n = qweight.shape[0]
    if qweight.dtype == np.uint8:  # the codes q in column order
        values = np.take(_NIBBLE_PAIRS, qweight).view(np.float32).reshape(n, -1)
    else:
        values = qweight.astype(np.float32)
    if kind in K_QUANTS:
        return _dequantize_k(entries, kind, values)
    values = values.reshape(n, -1, GROUP_SIZE)
    if kind == "Q4_0":
        values -= np.float32(8)  # exact, as gguf's integer q - 8 is
    values *= np.asarray(entries["scales"]).astype(np.float32)[..., None]
    if kind == "Q4_1":
        values += np.asarray(entries["biases"]).astype(np.float32)[..., None]
    return values.reshape(n, -1)


def k_block_constants(entries: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A K-quant tensor's per-sub-block float32 (scale, min) as gguf forms them, d * sc (and dmin * m), each
    product rounded to float32 first: [N, K/32] each for Q4_K / Q5_K, scale [N, K/16] and None for Q6_K.
    The one place the backends (torch's int4 codes, MLX's affine blocks) and dequantize() read them from."""
    supers = np.asarray(entries["super_scales"]).astype(np.float32)  # [N, K/256, 1 or 2]
    n = supers.shape[0]
    subs = np.asarray(entries["sub_scales"]).astype(np.float32)
    if supers.shape[-1] == 1:  # Q6_K: one d, a scale per 16
        return (supers * subs.reshape(n, supers.shape[1], -1)).reshape(n, -1), None
    subs = subs.reshape(n, supers.shape[1], -1, 2)  # [N, K/256, 8, (sc, m)]
    scale, low = supers[..., 0:1] * subs[..., 0], supers[..., 1:2] * subs[..., 1]
    return scale.reshape(n, -1), low.reshape(n, -1)


def _dequantize_k(entries: Mapping[str, np.ndarray], kind: str, codes: np.ndarray) -> np.ndarray:
    """gguf's order: each sub-block's scale d * sc (and min dmin * m) rounded to float32 first, then
    scale * q (- min)."""
    n = codes.shape[0]
    scale, low = k_block_constants(entries)
    values = codes.reshape(n, scale.shape[1], -1)
    values *= scale[..., None]
    if low is not None:
        values -= low[..., None]
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
