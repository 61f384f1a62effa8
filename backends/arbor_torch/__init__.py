"""PyTorch backend for arbor: CUDA, Apple MPS and CPU."""

from __future__ import annotations

import os

# OpenMP threads spin a bounded while at a barrier, then sleep: libgomp's default (~300K rounds) stalls
# a busy machine, never spinning slows an idle one; 10K rounds suits both (docs/performance.md,
# "torch.compile and threads"). libgomp reads it when torch loads, so it must precede the import;
# whatever the user set wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

import torch  # noqa: E402

from arbor_core.errors import BackendUnavailableError, UsageError

from .memory import memory_info
from .quantize import QUANTIZE_MODES
from .runner import TorchModel

NAME = "torch"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_available() -> bool:
    return True


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA (and MPS, which runs it well), float32 on CPU where bf16 matmuls are slow."""
    return "float32" if torch.device(device).type == "cpu" else ("bfloat16" if torch.device(device).type == "cuda" else "float16")


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailableError("device 'mps' requested but Apple's MPS is not available here")
    if kind not in ("cpu", "cuda", "mps"):
        raise BackendUnavailableError(f"device {device!r} is not supported by the torch backend")


def load(checkpoint, device: str | None = None, dtype: str | None = None, kv_bits: int = 16,
         quantize: str | None = None) -> TorchModel:
    """The checkpoint on `device` (default_device()) in `dtype` (default_dtype(device)); kv_bits 8 or 16
    (arbor_cli.load validates it); quantize one of QUANTIZE_MODES, CPU only. With neither dtype nor
    quantize given, default_quantize decides (GGUF-block checkpoints on a CPU run int4 mode); an explicit dtype
    (`--dtype float32`) keeps the exact float path."""
    device = device or default_device()
    check_device(device)
    if dtype is None and quantize is None:
        quantize = default_quantize(checkpoint, device)
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise BackendUnavailableError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    check_quantize(quantize, device)
    return TorchModel.from_checkpoint(checkpoint, device, dtype, kv_bits=kv_bits, quantize=quantize)


def default_quantize(checkpoint, device: str) -> str | None:
    """What runs when no dtype or quantize is asked for: on a CPU, a checkpoint whose layers are stored as
    GGUF blocks runs them as they are, int4 mode with the compiled decode step: 4-bit kinds (Q4_0, Q4_1,
    Q4_K) on the int4 kernel from their codes, 8-bit kinds (Q8_0, Q5_0, Q5_K, Q6_K) as int8 rows
    (load_quantized.py); that is near the file's own precision (docs/performance.md, "CPU (2 cores)").
    Float checkpoints, and every GPU, keep float weights."""
    if torch.device(device).type != "cpu":
        return None
    from arbor_weights import quantized

    return "int4" if quantized.layer_bits(checkpoint) is not None else None


def check_quantize(quantize: str | None, device: str) -> None:
    """Weight-only int8/int4 runs PyTorch's CPU kernels; on a GPU the 16-bit path is the fast one."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise BackendUnavailableError(f"quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZE_MODES)}")
    if torch.device(device).type != "cpu":
        raise BackendUnavailableError(f"--quantize {quantize} runs on the CPU only; on {device} drop --quantize "
                                      "(the model runs in 16-bit there) or add --device cpu")


__all__ = ["NAME", "QUANTIZE_MODES", "TorchModel", "default_device", "default_dtype", "is_available", "load",
           "memory_info"]
