"""A LoRA adapter (train.py's adapter.safetensors + adapter.json) merged into its base model: W + (alpha / r) B A
for each adapted projection, the trained norm weights in place of the base's, and the adapter's
rope_scaling in config.json. The result is a normal float32 checkpoint (grow.write_checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from arbor_core.errors import CorruptModelError

from .grow import read_float_state, write_checkpoint


def read_adapter(directory: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / "adapter.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "adapter.safetensors"))
    except (OSError, ValueError) as e:
        raise CorruptModelError(f"{directory} holds no readable adapter ({e})") from None
    return tensors, meta


def merged_state(base: dict[str, np.ndarray], tensors: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """The base's float32 state with the adapter applied."""
    state = dict(base)
    scale = float(meta["alpha"]) / int(meta["rank"])
    for name, value in tensors.items():
        if name.endswith(".lora_a"):
            prefix = name[:-len(".lora_a")]
            update = tensors[prefix + ".lora_b"].astype(np.float32) @ value.astype(np.float32)
            if prefix + ".weight" not in state:
                raise CorruptModelError(f"the adapter adapts {prefix}, which the base model does not have")
            state[prefix + ".weight"] = state[prefix + ".weight"] + np.float32(scale) * update
        elif not name.endswith(".lora_b"):
            if name not in state or state[name].shape != value.shape:
                raise CorruptModelError(f"the adapter's {name} does not fit the base model")
            state[name] = value.astype(np.float32)
    return state


def merge_adapter(base_checkpoint, adapter_directory: str | Path, destination: str | Path) -> Path:
    tensors, meta = read_adapter(adapter_directory)
    state = merged_state(read_float_state(base_checkpoint), tensors, meta)
    config = base_checkpoint.config
    if meta.get("rope_scaling"):
        config = config.with_rope_scaling(meta["rope_scaling"])
    return write_checkpoint(state, config, destination, Path(base_checkpoint.path))
