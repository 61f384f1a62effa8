"""The safetensors file format, read and written directly: it is an 8-byte header length, a JSON
header (name -> dtype, shape, data offsets) and the raw tensor bytes.

Reading the header ourselves lets `open_checkpoint` catch a truncated download in microseconds
without mapping gigabytes; writing it ourselves lets an import stream one tensor at a time, so
converting a model never holds all of its weights in memory at once.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from arbor_core.errors import CorruptModelError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


def _corrupt(path: Path, detail: str) -> CorruptModelError:
    return CorruptModelError(
        f"{path} is truncated or not a safetensors file ({detail}); delete the model and download or "
        "convert it again")


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> {dtype, shape, data_offsets}), checked
    against the file's size so that a cut-off download is reported here, not at load time."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"{size} bytes long")
        header_len = int.from_bytes(prefix, "little")
        if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"header length {header_len} does not fit a {size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        _check_entry(path, name, info, data_bytes)
    return header


def _check_entry(path: Path, name: str, info: object, data_bytes: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise _corrupt(path, f"tensor {name} has a malformed header entry") from None
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise _corrupt(path, f"tensor {name} has offsets {begin}..{end}")
    if end > data_bytes:
        raise _corrupt(path, f"tensor {name} ends at byte {end} but the file holds {data_bytes} data bytes")
    if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - begin:
        raise _corrupt(path, f"tensor {name} of shape {shape} and dtype {dtype} spans {end - begin} bytes")


# numpy dtype -> safetensors dtype, for what an import writes
WRITE_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8", "uint8": "U8", "bfloat16": "BF16"}
STORED_AS = {"bfloat16": "uint16"}  # numpy has no bfloat16: its bits travel as uint16 (to_bfloat16_bits)


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, rounded to nearest even, as uint16 bits (what torch's .to(bfloat16) gives)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def write_safetensors(
    path: str | Path,
    layout: Sequence[tuple[str, tuple[int, ...], str]],
    tensor: Callable[[str], np.ndarray],
    advance: Callable[[int], None] = lambda n: None,
) -> None:
    """Write the tensors named in `layout` (name, shape, a dtype of WRITE_DTYPES; bfloat16 given as its
    uint16 bits), asking
    `tensor(name)` for each in turn, in layout order.

    The header is written first from the shapes alone, then each tensor's bytes, so peak memory is
    one tensor. The file is written beside `path` and renamed into place: a reader never sees half of
    it. The result loads with safetensors.safe_open and with transformers.
    """
    path = Path(path)
    offsets, position = {}, 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * np.dtype(STORED_AS.get(dtype, dtype)).itemsize
        offsets[name] = {"dtype": WRITE_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [position, position + nbytes]}
        position += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header so tensor data stays 8-byte aligned
    partial = path.with_name(f".tmp-{path.name}+{uuid.uuid4().hex[:8]}")
    try:
        with open(partial, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name, shape, dtype in layout:
                values = np.ascontiguousarray(tensor(name), dtype=np.dtype(STORED_AS.get(dtype, dtype)).newbyteorder("<"))
                if values.shape != tuple(shape):
                    raise ValueError(f"tensor {name} has shape {values.shape}, expected {tuple(shape)}")
                f.write(memoryview(values).cast("B"))
                advance(1)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

