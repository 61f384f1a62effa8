"""A checkpoint that keeps GGUF blocks (arbor_weights/quantized.py) onto torch.

Without --quantize every block-quantized tensor is dequantized exactly: the float32 the old float32
import held, bit for bit. With --quantize int4 the 4-bit layers become Int4Linear straight from their
codes. A Q4_1 block's w = d*q + m is the int4 kernel's (q - 8) * scale + zero with scale = d and
zero = m + 8d (Q4_0: zero = 0), and those are the numbers quantize_int4 recovers from the float
weights of a Q4_1 block, so the model equals quantize_model's on the float import while no layer is
ever float. Everything else (fused shapes, the int8 head and embedding, fallbacks) is quantize_model's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from arbor_core.errors import CorruptModelError
from arbor_weights import quantized

from .quantize import (
    HEAD_MODE,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    int4_linear_from_codes,
    int8_linear_from_codes,
    quantize_int8,
    quantized_linear,
)

ENTRY_DTYPES = (torch.uint8, torch.int8, torch.float16)
INT8_ROWS = 4096  # rows of the head / embedding dequantized at a time: 9 MB of float32, not 113 MB


def has_blocks(state: dict[str, torch.Tensor]) -> bool:
    return any(name.endswith(".qweight") for name in state)


def numpy_entries(entries: dict[str, torch.Tensor], where) -> dict[str, np.ndarray]:
    """One quantized tensor's entries as numpy views, their dtypes and shapes checked (quantized.kind_of)."""
    if any(t.dtype not in ENTRY_DTYPES for t in entries.values()):
        raise CorruptModelError(f"{where} holds quantized entries of dtypes {sorted({str(t.dtype) for t in entries.values()})}"
                                "; re-convert the model")
    arrays = {suffix: t.numpy() for suffix, t in entries.items()}
    quantized.kind_of(arrays, where)
    return arrays


def dequantized_state(state: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """The state with every quantized tensor as its exact float32 `<base>.weight`."""
    floats, groups = quantized.split_state(state)
    for base, entries in groups.items():
        floats[f"{base}.weight"] = torch.from_numpy(quantized.dequantize(numpy_entries(entries, where)))
    return floats


def int4_parts(entries: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] 0..15, scale, zero [N, K/32] float32) of a Q4_0 / Q4_1 tensor, for int4_linear_from_codes."""
    packed = torch.from_numpy(entries["qweight"])
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    scale = torch.from_numpy(entries["scales"]).float()
    if "biases" not in entries:
        return codes, scale, torch.zeros_like(scale)
    return codes, scale, torch.from_numpy(entries["biases"]).float() + 8 * scale  # as quantize_int4: lo + 8 * scale


def load_int4(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where) -> None:
    """Fill the meta-device `model` as quantize_model(model, "int4") leaves a loaded float one."""
    floats, groups = quantized.split_state(state)
    numpy_groups = {base: numpy_entries(entries, where) for base, entries in groups.items()}

    def float_weight(base: str) -> torch.Tensor:  # as the float model holds it: exact, then in `dtype`
        if base in numpy_groups:
            return torch.from_numpy(quantized.dequantize(numpy_groups[base])).to(dtype)
        return floats[f"{base}.weight"].to(dtype)

    def bias(bases: list[str]) -> nn.Parameter | None:
        parts = [floats.get(f"{base}.bias") for base in bases]
        return None if parts[0] is None else nn.Parameter(torch.cat(parts).to(dtype).clone(), requires_grad=False)

    def linear(bases: list[str]) -> nn.Module:  # the rows of `bases` in one int4 Linear, as fused_quantized_linear
        if all(base in numpy_groups and numpy_groups[base]["qweight"].dtype == np.uint8 for base in bases):
            codes, scale, zero = (torch.cat(parts) for parts in zip(*(int4_parts(numpy_groups[b]) for b in bases)))
            if Int4Linear.supports(codes):
                return int4_linear_from_codes(codes, scale, zero, bias(bases))
        return quantized_linear(torch.cat([float_weight(base) for base in bases]), bias(bases), "int4")

    for i, layer in enumerate(model.model.layers):  # fused in model.fuse_layer's order: q, k, v and gate, up
        attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
        attn.qkv_proj = linear([f"{p}self_attn.{x}_proj" for x in "qkv"])
        mlp.gate_up_proj = linear([f"{p}mlp.gate_proj", f"{p}mlp.up_proj"])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        attn.o_proj = linear([f"{p}self_attn.o_proj"])
        mlp.down_proj = linear([f"{p}mlp.down_proj"])
    def int8_linear(base: str, bias: nn.Parameter | None = None) -> Int8Linear:  # Int8Linear(float_weight(base))
        if base not in numpy_groups:
            return Int8Linear(float_weight(base), bias)
        entries, rows = numpy_groups[base], numpy_groups[base]["qweight"].shape[0]
        blocks = [quantize_int8(torch.from_numpy(quantized.dequantize({s: a[i:i + INT8_ROWS] for s, a in entries.items()}))
                                .to(dtype)) for i in range(0, rows, INT8_ROWS)]
        return int8_linear_from_codes(torch.cat([q for q, _ in blocks]), torch.cat([s for _, s in blocks]), bias)

    tied = model.config.tie_word_embeddings
    head = "model.embed_tokens" if tied else "lm_head"
    model.lm_head = int8_linear(head, bias(["lm_head"])) if HEAD_MODE["int4"] == "int8" else \
        quantized_linear(float_weight(head), bias(["lm_head"]), HEAD_MODE["int4"])
    codes = model.lm_head if tied and isinstance(model.lm_head, Int8Linear) else int8_linear("model.embed_tokens")
    model.model.embed_tokens = Int8Embedding(codes, dtype)
    # the norms, copied out of the memory-mapped file (why: the end of quantize_model)
    norms = {name: t.to(dtype).clone() for name, t in floats.items() if name.endswith("norm.weight")}
    model.load_state_dict(norms, strict=False, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise CorruptModelError(f"weights in {where} leave part of the model unset; re-convert the model")
