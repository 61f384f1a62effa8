"""An Arbor checkpoint as a Hugging Face model directory (`arbor export SRC DST --format hf`).

What transformers and vLLM load as they are: config.json (HF Llama fields; the rope_scaling arbor would
run with at the asked context, when that is beyond the trained one), model.safetensors in bfloat16 or
float32 (GGUF blocks dequantized exactly as arbor's own float path does, quantized.dequantize), the
tokenizer files with the chat template (tokenizer.json, tokenizer_config.json, ...) and
generation_config.json. Tensors are written one at a time into a temporary directory beside DST, which
is renamed into place at the end: an interrupted export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from arbor_core.errors import UsageError

from .quantized import SUFFIXES, dequantize, kind_of
from .safetensors_file import read_safetensors_header, to_bfloat16_bits, write_safetensors

FORMATS = ("hf",)
DTYPES = ("bfloat16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
ARBOR_ONLY = ("quantization",)  # config fields of arbor's own that a HF directory does not carry


def export_hf(checkpoint, destination: str | Path, *, dtype: str = "bfloat16", rope_scaling: dict | None = None,
              advance: Callable[[int], None] = lambda n: None) -> Path:
    """Write `checkpoint` as a HF directory at `destination` (absent or empty); its path."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype for an export must be {' or '.join(DTYPES)}, got {dtype!r}")
    dst = Path(destination).expanduser().absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"{dst} already exists and is not an empty directory")
    tokenizer = [name for name in TOKENIZER_FILES if (Path(checkpoint.path) / name).is_file()]
    if not any(name in tokenizer for name in ("tokenizer.json", "tokenizer.model")):
        raise UsageError(f"{checkpoint.name} has no tokenizer.json or tokenizer.model to export")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        _write_weights(checkpoint, work / "model.safetensors", dtype, advance)
        config = hf_config(checkpoint.config, dtype, rope_scaling)
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in tokenizer:
            shutil.copyfile(Path(checkpoint.path) / name, work / name)
        generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(work, dst)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dst


def hf_config(config, dtype: str, rope_scaling: dict | None) -> dict:
    """config.json for transformers and vLLM: arbor's config without its own fields, with `rope_scaling`
    (the model's own when it has one; max_position_embeddings stays the trained length, as HF's YaRN
    configs keep it beside original_max_position_embeddings)."""
    out = {k: v for k, v in config.to_dict().items() if k not in ARBOR_ONLY}
    if not out.get("attention_out_bias"):
        out.pop("attention_out_bias", None)  # not a HF Llama field; only a true value must travel
    if out.get("sliding_window") is None:
        out.pop("sliding_window", None)
    scaling = config.rope_scaling or rope_scaling
    if scaling:
        out["rope_scaling"] = dict(scaling)
    out["torch_dtype"] = dtype
    return out


def _write_weights(checkpoint, path: Path, dtype: str, advance: Callable[[int], None]) -> None:
    """model.safetensors with HF names, dequantizing GGUF blocks, one tensor in memory at a time."""
    from safetensors import safe_open

    where: dict[str, Path] = {}  # HF name -> the file holding it (a quantized one: its entries' file)
    quantized: dict[str, dict[str, str]] = {}  # HF name -> {suffix: stored name}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint.weight_files:
        for name, info in read_safetensors_header(file).items():
            base, _, suffix = name.rpartition(".")
            if suffix not in SUFFIXES:
                where[name], shapes[name] = file, tuple(info["shape"])
                continue
            quantized.setdefault(f"{base}.weight", {})[suffix] = name
            where[f"{base}.weight"] = file
            if suffix == "qweight":  # 4-bit codes are packed two a byte (quantized.py)
                rows, columns = info["shape"]
                shapes[f"{base}.weight"] = (rows, columns * 2 if info["dtype"] == "U8" else columns)

    def load(name: str) -> np.ndarray:
        with safe_open(str(where[name]), framework="np") as f:
            if name in quantized:
                entries = {suffix: f.get_tensor(stored) for suffix, stored in quantized[name].items()}
                kind_of(entries, str(checkpoint.path))
                values = dequantize(entries)
            else:
                values = f.get_tensor(name).astype(np.float32, copy=False)
        return to_bfloat16_bits(values) if dtype == "bfloat16" else values

    layout = [(name, shapes[name], dtype) for name in sorted(shapes)]
    write_safetensors(path, layout, load, advance)
