"""PyTorch backend for arbor: CUDA, Apple MPS and CPU."""

from __future__ import annotations

import torch

from arbor_cli.errors import BackendUnavailableError

from .memory import memory_info
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
        raise BackendUnavailableError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailableError("device 'mps' requested but Apple's MPS is not available here")
    if kind not in ("cpu", "cuda", "mps"):
        raise BackendUnavailableError(f"device {device!r} is not supported by the torch backend")


def load(checkpoint, device: str | None = None, dtype: str | None = None, kv_bits: int = 16) -> TorchModel:
    device = device or default_device()
    check_device(device)
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise BackendUnavailableError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if kv_bits not in (8, 16):
        raise BackendUnavailableError(f"kv_bits {kv_bits!r} is not supported; use 8 or 16")
    return TorchModel.from_checkpoint(checkpoint, device, dtype, kv_bits=kv_bits)


__all__ = ["NAME", "is_available", "default_device", "default_dtype", "memory_info", "load", "TorchModel"]
