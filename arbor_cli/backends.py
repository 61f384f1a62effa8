"""Which backends exist and which one runs: the app's only code that imports a backend package
(by name, with importlib, so that a machine without torch or MLX still starts). What a backend must
offer is arbor_core/backend.py's protocol."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

from arbor_core.errors import BackendUnavailableError, UsageError

BACKEND_PACKAGES = {"torch": ("arbor_torch", "torch"), "mlx": ("arbor_mlx", "mlx")}
INSTALL_HINT = {"torch": "pip install 'arbor-cli[torch]'", "mlx": "pip install 'arbor-cli[mlx]' (Linux: [mlx-cpu])"}


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def installed(name: str) -> bool:
    package, framework = BACKEND_PACKAGES[name]
    return importlib.util.find_spec(framework) is not None and importlib.util.find_spec(package) is not None


def backend_module(name: str):
    package, _ = BACKEND_PACKAGES[name]
    return importlib.import_module(package)


def select_backend(name: str | None = None):
    """The backend module for `name` ('torch', 'mlx', or None/'auto'): backend_module(choose_backend(name))."""
    return backend_module(choose_backend(name))


def choose_backend(name: str | None = None) -> str:
    """The backend `name` ('torch', 'mlx', or None/'auto') means here, checked without importing it (importing
    torch is most of a start: a caller may do other work first).

    auto: MLX on Apple Silicon; torch where a CUDA device exists; else torch on CPU; else MLX.
    """
    if name not in (None, "auto"):
        if name not in BACKEND_PACKAGES:
            raise UsageError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKEND_PACKAGES)}")
        if not installed(name):
            raise BackendUnavailableError(f"backend {name!r} is not installed here; {INSTALL_HINT[name]}")
        return name
    order = ["mlx", "torch"] if is_apple_silicon() else ["torch", "mlx"]
    available = [n for n in order if installed(n)]
    if not available:
        raise BackendUnavailableError(f"no backend is installed; {INSTALL_HINT['torch']}")
    return available[0]


def transformers_peer():
    """The transformers reference engine `arbor bench --vs hf` runs beside arbor (it needs torch)."""
    if not installed("torch"):
        raise BackendUnavailableError(f"--vs hf needs torch and transformers; {INSTALL_HINT['torch']}")
    return importlib.import_module("arbor_torch.transformers_peer")


def trainer():
    """The training loop (`arbor train`): it runs on the torch backend's Transformer (train.py)."""
    if not installed("torch"):
        raise BackendUnavailableError(f"arbor train needs torch; {INSTALL_HINT['torch']}")
    return importlib.import_module("arbor_torch.train")
