"""A checkpoint that keeps GGUF blocks (arbor_weights/quantized.py) onto torch.

Without --quantize every block-quantized tensor is dequantized exactly: the float32 the old float32
import held, bit for bit. With --quantize int4 (the CPU default for such checkpoints) the model is built
layer by layer from the blocks, never holding a float copy of it:

- 4-bit kinds (Q4_0, Q4_1, Q4_K) become Int4Linear straight from their codes: the kernel computes
  (q - 8) * scale + zero per 32 inputs, which is Q4_1's d * q + m with scale d, zero m + 8d (Q4_0: zero
  0), and Q4_K's (d * sc) * q - dmin * m with scale d * sc, zero 8 * scale - dmin * m. For Q4_1 those
  are the numbers quantize_int4 recovers from the float weights, so that model equals quantize_model's
  on the float import; the only loss is the kernel's bfloat16 scale and zero.
- 8-bit kinds (Q8_0, Q5_0, Q5_K, Q6_K) become Int8Linear: one scale per row, re-fitted at load from
  the exact dequantized rows, a block of rows at a time. Why not their own group scales: PyTorch's CPU
  int8 kernel takes one scale per row (a 1536x8960 matvec in 0.39 ms), where a compiled group-scaled
  reduction took 1.6 ms and the int4 kernel refuses groups of 16 (Q6_K's). Why not int4, as these
  layers were before (re-fitted from float, 16 levels a group of 32): against the exact dequantization,
  teacher-forced over 384 tokens of README.md (prefill path, max |logit diff| / max |logit|, relative
  norm, top-1 agreement), int8 rows are closer on both real Qwen files, for more bytes in those layers:
      Qwen2.5-Coder-0.5B (Q5_0/Q8_0 layers)   int8 rows 0.026, 0.021, 96.4%  (612 MB of weights)
                                              int4      0.152, 0.120, 84.6%  (497 MB)
      Qwen2.5-Coder-1.5B Q4_K_M (Q6_K v/down)  int8 rows 0.042, 0.013, 96.6%  (1361 MB)
                                              int4      0.063, 0.041, 94.8%  (1287 MB)
- A fused projection (q/k/v, gate/up) whose parts come in different kinds is one module per run of
  parts of the same format, joined by StackedLinear, so Q4_K_M's Q6_K v never forces its Q4_K q and k
  through a lossy re-quantization; float parts are quantized as quantize_model does.

The head and the embedding are int8 rows (HEAD_MODE), from the exact rows a block at a time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from arbor_core.errors import CorruptModelError
from arbor_weights import quantized

from . import integer_kernels
from .memory import release_freed_heap
from .quantize import (
    ACT_DTYPE,
    HEAD_MODE,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    StackedLinear,
    int4_linear_from_codes,
    int8_linear_from_codes,
    quantize_int8,
    quantized_linear,
)

ENTRY_DTYPES = (torch.uint8, torch.int8, torch.float16)
INT8_ROWS = 4096  # rows dequantized at a time for an int8 layer: 25 MB of float32 for a 1536-wide one
INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")  # codes the int4 kernel runs as they are
# how the other (8-bit) kinds run: "int8" rows; "float" is the alternative measured above (re-fitted from
# the exact weights as quantize_model does: int4 groups, what these layers were before)
EIGHT_BIT_FORMAT = "int8"
# how the 4-bit kinds run: "int4" (their codes); "int8" rows re-fitted from the exact weights is the measured
# alternative for prefill (docs/performance.md, "Prefill without the per-call dequantization"): no int4 ->
# bf16 pass per layer and call, at +0.42 GB on the 1.5B (int8 rows hold a byte a weight, int4 0.625)
FOUR_BIT_FORMAT = "int4"


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
    """(codes [N, K] 0..15, scale, zero [N, K/32] float32) of a Q4_0 / Q4_1 / Q4_K tensor, for
    int4_linear_from_codes: w = (q - 8) * scale + zero."""
    packed = torch.from_numpy(entries["qweight"])
    rows = packed.shape[0]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, -1)
    if "super_scales" in entries:  # Q4_K: each 32's scale d * sc and min dmin * m, as float32 products (as gguf)
        scale, low = (torch.from_numpy(a) for a in quantized.k_block_constants(entries))
        return codes, scale, 8 * scale - low
    scale = torch.from_numpy(entries["scales"]).float()
    if "biases" not in entries:
        return codes, scale, torch.zeros_like(scale)
    return codes, scale, torch.from_numpy(entries["biases"]).float() + 8 * scale  # as quantize_int4: lo + 8 * scale


class BlockLoader:
    """Builds the int4-mode modules of a model from a checkpoint's state, one projection at a time."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype, where):
        self.floats, groups = quantized.split_state(state)
        self.groups = {base: numpy_entries(entries, where) for base, entries in groups.items()}
        self.kinds = {base: quantized.kind_of(entries, where) for base, entries in self.groups.items()}
        self.dtype = dtype
        # K-quant models run on arbor's integer kernels where they build (integer_kernels.py): Q4_K as its own
        # numbers (Q4KLinear), the 8-bit kinds' int8 rows through i8_mm; other models keep PyTorch's kernels
        self.integer = any(kind in quantized.K_QUANTS for kind in self.kinds.values()) and integer_kernels.available()

    def float_weight(self, base: str) -> torch.Tensor:
        """The weight as the float model holds it: exact, then in `dtype`."""
        if base in self.groups:
            return torch.from_numpy(quantized.dequantize(self.groups[base])).to(self.dtype)
        return self.floats[f"{base}.weight"].to(self.dtype)

    def bias(self, bases: list[str]) -> nn.Parameter | None:
        parts = [self.floats.get(f"{base}.bias") for base in bases]
        return None if parts[0] is None else nn.Parameter(torch.cat(parts).to(self.dtype).clone(), requires_grad=False)

    def format_of(self, base: str) -> str:
        """"int4" (the codes run as they are), "int8" (an 8-bit kind, rows re-fitted), "q6k" (Q6_K's own numbers,
        on the integer kernels) or "float"."""
        kind = self.kinds.get(base)
        if self.integer and kind in ("Q6_K", "Q8_0"):  # Q8_0: Q5_0 too (stored as Q8_0)
            return "q6k" if kind == "Q6_K" else "q8"
        return "float" if kind is None else FOUR_BIT_FORMAT if kind in INT4_KINDS else EIGHT_BIT_FORMAT

    def entries_of(self, bases: list[str]) -> list[np.ndarray]:
        """qweight, super_scales, sub_scales of `bases`, their rows one after the other (a fused projection)."""
        return [np.concatenate([self.groups[b][s] for b in bases]) for s in ("qweight", "super_scales", "sub_scales")]

    def projection(self, bases: list[str]) -> nn.Module:
        """The rows of `bases` (q, k, v; gate, up; or one) as one module, in that order: each run of
        consecutive bases of one format is one Linear (fused rows), several runs a StackedLinear."""
        runs: list[tuple[str, list[str]]] = []
        for base in bases:
            if runs and runs[-1][0] == self.format_of(base):
                runs[-1][1].append(base)
            else:
                runs.append((self.format_of(base), [base]))
        parts = [self.linear(form, run) for form, run in runs]
        return parts[0] if len(parts) == 1 else StackedLinear(parts)

    def linear(self, form: str, bases: list[str]) -> nn.Module:
        if form == "q8":  # Q5_0's codes (-16..15) in 5.5 bits, Q8_0's in 8.5
            entries = [np.concatenate([self.groups[b][s] for b in bases]) for s in ("qweight", "scales")]
            if integer_kernels.fits_five_bits(entries[0]):
                return integer_kernels.Q5Linear(integer_kernels.pack_q5(*entries), len(entries[0]), self.bias(bases))
            return integer_kernels.Q8Linear(integer_kernels.pack_q8(*entries), len(entries[0]), self.bias(bases))
        if form == "q6k":
            entries = self.entries_of(bases)
            return integer_kernels.Q6KLinear(integer_kernels.pack_q6k(*entries), len(entries[0]), self.bias(bases))
        if form == "int4" and self.integer and all(self.kinds[b] == "Q4_K" for b in bases):
            entries = self.entries_of(bases)
            return integer_kernels.Q4KLinear(integer_kernels.pack_q4k(*entries), len(entries[0]), self.bias(bases))
        if form == "int4":
            codes, scale, zero = (torch.cat(parts) for parts in zip(*(int4_parts(self.groups[b]) for b in bases)))
            if Int4Linear.supports(codes):
                return int4_linear_from_codes(codes, scale, zero, self.bias(bases))
            form = "int8"  # rows the int4 kernel cannot tile: int8 rows of the exact weights, as quantized_linear
        if form == "int8":
            return self.int8_linear(bases, self.bias(bases))
        return quantized_linear(torch.cat([self.float_weight(base) for base in bases]), self.bias(bases), "int4")

    def int8_linear(self, bases: list[str], bias: nn.Parameter | None = None) -> Int8Linear:
        """Int8Linear(cat of the float weights) without them: rows are quantized independently, so a block
        of rows at a time gives the same codes and scales."""
        if any(base not in self.groups for base in bases):
            linear = Int8Linear(torch.cat([self.float_weight(base) for base in bases]), bias)
            linear.integer = self.integer
            return linear
        qweight = self.groups[bases[0]]["qweight"]
        columns = qweight.shape[1] * (2 if qweight.dtype == np.uint8 else 1)  # 4-bit codes are two a byte
        sizes = [self.groups[base]["qweight"].shape[0] for base in bases]
        # filled in place, a block of rows at a time: never a second copy of a 151,936-row table
        codes, scales = torch.empty(sum(sizes), columns, dtype=torch.int8), torch.empty(sum(sizes), dtype=ACT_DTYPE)
        start = 0
        for base, size in zip(bases, sizes):
            entries = self.groups[base]
            for i in range(0, size, INT8_ROWS):
                rows = quantized.dequantize({s: a[i:i + INT8_ROWS] for s, a in entries.items()})
                q, scale = quantize_int8(torch.from_numpy(rows).to(self.dtype))
                codes[start + i:start + i + q.shape[0]], scales[start + i:start + i + q.shape[0]] = q, scale
            start += size
        linear = int8_linear_from_codes(codes, scales, bias)
        linear.integer = self.integer
        return linear


def load_int4(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where) -> None:
    """Fill the meta-device `model` as quantize_model(model, "int4") leaves a loaded float one, its
    layers from the blocks as the module docstring says."""
    loader = BlockLoader(state, dtype, where)
    for i, layer in enumerate(model.model.layers):  # fused in model.fuse_layer's order: q, k, v and gate, up
        attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
        attn.qkv_proj = loader.projection([f"{p}self_attn.{x}_proj" for x in "qkv"])
        mlp.gate_up_proj = loader.projection([f"{p}mlp.gate_proj", f"{p}mlp.up_proj"])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        attn.o_proj = loader.projection([f"{p}self_attn.o_proj"])
        mlp.down_proj = loader.projection([f"{p}mlp.down_proj"])
        release_freed_heap()  # a layer's transients (int32 codes, row blocks) freed: not kept as the peak grows
    tied = model.config.tie_word_embeddings
    head = "model.embed_tokens" if tied else "lm_head"
    if loader.format_of(head) in ("q6k", "q8"):  # the file's own numbers, and (tied) the embedding's rows too
        model.lm_head = loader.linear(loader.format_of(head), [head])
        model.lm_head.bias = loader.bias(["lm_head"])
    elif HEAD_MODE["int4"] == "int8":
        model.lm_head = loader.int8_linear([head], loader.bias(["lm_head"]))
    else:
        model.lm_head = quantized_linear(loader.float_weight(head), loader.bias(["lm_head"]), HEAD_MODE["int4"])
    if tied and isinstance(model.lm_head, (Int8Linear, *integer_kernels.ROW_LAYERS)):
        codes = model.lm_head
    elif loader.format_of("model.embed_tokens") in ("q6k", "q8"):
        codes = loader.linear(loader.format_of("model.embed_tokens"), ["model.embed_tokens"])
    elif loader.integer and loader.kinds.get("model.embed_tokens") == "Q4_K":  # rows read from the Q4_K layout
        codes = loader.linear("int4", ["model.embed_tokens"])
    else:
        codes = loader.int8_linear(["model.embed_tokens"])
    model.model.embed_tokens = Int8Embedding(codes, dtype)
    # the norms, copied out of the memory-mapped file (why: the end of quantize_model)
    norms = {name: t.to(dtype).clone() for name, t in loader.floats.items() if name.endswith("norm.weight")}
    model.load_state_dict(norms, strict=False, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise CorruptModelError(f"weights in {where} leave part of the model unset; re-convert the model")
