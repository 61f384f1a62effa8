"""MLX backend for arbor: Apple Silicon's GPU through Metal, or the CPU (mlx[cpu] on Linux).

Imports mlx only: a machine with `mlx` and no `torch` runs every arbor command on this backend.
"""

from __future__ import annotations

import mlx.core as mx

from arbor_core.errors import BackendUnavailableError, UsageError

from .memory import memory_info, metal_available
from .runner import MLXModel

NAME = "mlx"
# no --quantize: MLX re-quantizes no float weights; a checkpoint of GGUF blocks runs them as they are (load)
QUANTIZE_MODES: tuple[str, ...] = ()
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEVICE_ALIASES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu", "mps": "gpu"}


def is_available() -> bool:
    return True


def default_device() -> str:
    return "gpu" if metal_available() else "cpu"


def default_dtype(device: str) -> str:
    """bfloat16 on Apple GPUs (the checkpoints' own dtype, with float32's range), float32 on CPU."""
    return "bfloat16" if DEVICE_ALIASES.get(device) == "gpu" else "float32"


def check_device(device: str) -> str:
    """The MLX device name for `device` ('cpu' or 'gpu'); a clear error for anything MLX cannot run on."""
    kind = DEVICE_ALIASES.get(device)
    if kind is None:  # a device some backend has (cuda) is this backend's limit; a name no backend knows, a typo
        known = device.split(":")[0] in ("cuda", "mps", "xpu")
        raise (BackendUnavailableError if known else UsageError)(
            f"device {device!r} is not supported by the mlx backend; use cpu or gpu")
    if kind == "gpu" and not metal_available():
        raise BackendUnavailableError(f"device {device!r} requested but MLX has no Metal GPU here (use --device cpu)")
    return kind


def load(checkpoint, device: str | None = None, dtype: str | None = None, kv_bits: int = 16,
         quantize: str | None = None) -> MLXModel:
    """The checkpoint on `device` (default_device()) in `dtype` (default_dtype(device)); kv_bits 8 or 16
    (arbor_cli.load validates it). `quantize` must be None: this backend re-quantizes no float weights.

    With no dtype, a checkpoint of GGUF blocks (a GGUF import) runs them as MLX quantized layers, the
    file's own values at its own size (blocks.py; the model's `quantize` reads "gguf-blocks"). An explicit
    dtype asks for float weights instead, as on torch (`--dtype float32`: the exact float path)."""
    if quantize is not None:
        raise BackendUnavailableError(f"the mlx backend does not support quantize={quantize!r}")
    device = check_device(device or default_device())
    blocks = dtype is None
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise BackendUnavailableError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return MLXModel.from_checkpoint(checkpoint, device, dtype, kv_bits=kv_bits, blocks=blocks)


__all__ = ["NAME", "QUANTIZE_MODES", "MLXModel", "default_device", "default_dtype", "is_available", "load", "memory_info"]
