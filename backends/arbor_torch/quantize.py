"""Weight-only quantization of the Linear layers: int8 per output channel, int4 in groups.

Why: a CPU decode step streams every weight once per token, so its speed is set by the bytes read;
int8 reads a quarter of fp32's, int4 an eighth. Activations stay float and only the matmul's weight
operand is quantized, which is what llama.cpp's Q8_0 / Q4 formats do too.

Kernels are PyTorch's own CPU ones, `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`.
Both are fast only with bfloat16 activations, so the input is cast to bf16 at the matmul and the
result back; the kernels accumulate in float32. For many rows at once (prefill) the same kernels are
slower than a bf16 GEMM, so there the weight is dequantized to bf16 on the fly, one layer at a time,
and oneDNN does the GEMM. The measurements behind both choices: docs/performance.md, "Kernel choice".

Formats:
  int8: symmetric, scale = max|w| / 127 per output row; w ~= q * scale.
  int4: asymmetric per group of `group_size` inputs of a row, 16 levels between the group's min and
        max; w ~= (q - 8) * scale + zero with zero = min + 8 * scale, the layout the int4 kernel takes.
  The output head is int8 in both modes (HEAD_MODE), and the token embedding int8 rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .model import fuse_layer

QUANTIZE_MODES = ("int8", "int4")
ACT_DTYPE = torch.bfloat16  # what the kernels take as input
# Inputs per int4 (scale, zero): 32 is the block of GGUF's Q4_0/Q4_1, so their weights come back exactly;
# on the default model group 64 made the logits 4.5x further from fp32 (128 does not divide its 576).
INT4_GROUP = 32
INT4_BLOCK_N = 64  # rows the CPU int4 kernel interleaves in its packed layout (checked in int4_layout_known)
# From this many activation rows on, dequantize and run a bf16 GEMM (prefill). Where it pays depends on
# the CPU: on a Zen 4 the GEMM already wins at 16 rows (3072x576, 1 thread: 370 us vs 868 for the int8
# kernel and 680 for int4); on a 2-core Xeon without AMX (avx512_bf16) the int4 kernel wins up to ~512
# rows (1536x576 at 32 rows: 0.47 ms vs 2.73; 576x1536 at 512: 8.3 vs 7.6), and a 30-token prefill after
# a cached document (ask.py's question) took 0.45 s at 16 against 0.17 s at 64. 64 keeps most of both.
DEQUANT_ROWS = 64


def quantize_int8(w: torch.Tensor, scale_dtype=ACT_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale [N]) with w ~= q * scale[:, None]; |error| <= scale / 2 (and <= 0.4% of max|w|
    for the row's largest value, whose code may clip at 127 after the scale is rounded to `scale_dtype`)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)  # the codes use the scale the kernel sees
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 in 0..15 [N, K], scale [N, K/g], zero [N, K/g]) with w ~= (q - 8) * scale + zero per group."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    # Lossless on weights imported from a Q4_1 GGUF at group 32: its blocks are exactly min + step * (0..15)
    # with codes 0 and 15 both used, so (max - min) / 15 recovers the block's own step.
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, lo + 8 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[N, K] weights from 0..15 codes and per-group scale/zero ([N, K/g] each)."""
    N, K = q.shape
    g = K // scale.shape[1]
    w = (q.reshape(N, K // g, g).to(dtype) - 8) * scale[..., None].to(dtype) + zero[..., None].to(dtype)
    return w.reshape(N, K)


def unpack_int4_cpu(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The 0..15 codes [N, K] back from `_convert_weight_to_int4pack_for_cpu`'s layout.

    That layout (PyTorch 2.x CPU kernel) stores, per block of 64 rows and per input k, 32 bytes:
    the low nibble of byte j is row j of the block, the high nibble row j + 32.
    """
    p = packed.reshape(N // INT4_BLOCK_N, K, INT4_BLOCK_N // 2)
    codes = torch.cat([p & 0xF, p >> 4], dim=-1)  # (blocks, K, 64): rows j then j + 32
    return codes.transpose(1, 2).reshape(N, K)


_layout_checked: bool | None = None


def int4_layout_known() -> bool:
    """Whether unpack_int4_cpu reads this PyTorch's packed layout (checked once, on a small tensor).

    If a PyTorch release changes the layout, prefill falls back to the int4 kernel itself: slower,
    never wrong.
    """
    global _layout_checked
    if _layout_checked is None:
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (2 * INT4_BLOCK_N, 64), dtype=torch.int32, generator=generator)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        _layout_checked = torch.equal(unpack_int4_cpu(packed, *codes.shape).to(torch.int32), codes)
    return _layout_checked


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 [N, K] and a float scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_int8(weight)  # scale in bf16: the kernel wants the activations' dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = bias

    # True: run arbor's int8 x int8 kernel (integer_kernels.py, K-quant models), the activations quantized per 32
    integer = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer:
            y = torch.ops.arbor.i8_mm(x.reshape(-1, self.in_features), self.qweight, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        rows = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        if rows.shape[0] >= DEQUANT_ROWS:
            y = F.linear(rows, self.qweight.to(ACT_DTYPE) * self.scale[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T + bias, with 4-bit codes packed for PyTorch's CPU int4 kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        q, scale, zero = quantize_int4(weight, group_size)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [K/g, N, 2]: the kernel's layout
        self.register_buffer("scale_zero", scale_zero.contiguous().to(ACT_DTYPE))
        self.bias = bias

    @staticmethod
    def supports(weight: torch.Tensor, group_size: int = INT4_GROUP) -> bool:
        N, K = weight.shape
        return K % group_size == 0 and N % INT4_BLOCK_N == 0

    def dequantized(self, dtype=ACT_DTYPE) -> torch.Tensor:
        codes = unpack_int4_cpu(self.qweight, self.out_features, self.in_features)
        scale, zero = self.scale_zero[..., 0].t(), self.scale_zero[..., 1].t()  # [N, K/g]
        return dequantize_int4(codes, scale, zero, dtype)

    def prefill_weight(self) -> torch.Tensor:
        """The bf16 weight [N, K] for a prefill GEMM, in 4 passes where `dequantized` takes 9: nibbles written
        straight into row order, then one fused (q * scale + (zero - 8 * scale)) per group. It can differ
        from `dequantized` by one bf16 rounding (the shifted zero is rounded once, not after each op)."""
        N, K, g = self.out_features, self.in_features, self.group_size
        packed = self.qweight.view(N // INT4_BLOCK_N, K, INT4_BLOCK_N // 2)
        codes = torch.empty(N // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, K, dtype=torch.uint8)
        torch.bitwise_and(packed, 0xF, out=codes[:, 0].transpose(1, 2))  # rows j of each block of 64
        torch.bitwise_right_shift(packed, 4, out=codes[:, 1].transpose(1, 2))  # rows j + 32
        scale = self.scale_zero[..., 0].t().float().contiguous()  # [N, K/g], row-major: the output is too
        zero = self.scale_zero[..., 1].t().float().contiguous()
        shifted = (zero - 8 * scale).to(ACT_DTYPE)[..., None]
        codes = codes.view(N, K // g, g).to(ACT_DTYPE)
        return torch.addcmul(shifted, codes, scale.to(ACT_DTYPE)[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        if rows.shape[0] >= DEQUANT_ROWS and int4_layout_known():
            y = F.linear(rows, self.prefill_weight())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self.scale_zero)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class StackedLinear(nn.Module):
    """Linears over the same input whose outputs, side by side, are one projection's: a fused q/k/v or
    gate/up whose parts a GGUF stores in different formats (Q4_K_M: q, k Q4_K, v Q6_K) runs each part in
    its own kernel instead of re-quantizing all of them to one. pieces.project splits the output as it
    splits a fused Linear's; the concatenation costs a copy of the (small) outputs."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> nn.Module:
    if mode == "int8":
        return Int8Linear(weight, bias)
    if mode == "int4":
        if Int4Linear.supports(weight):
            return Int4Linear(weight, bias)
        return Int8Linear(weight, bias)  # shapes the int4 kernel cannot tile: int8 keeps them fast and close
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")


class Int8Embedding(nn.Module):
    """Token embedding rows as int8 codes times a per-row scale, looked up and scaled to `dtype`.

    Rows of an embedding are the output channels of a tied head, so one Int8Linear's buffers serve
    both: the lookup reads one row per token and costs no extra memory.
    """

    def __init__(self, codes: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.codes, self.dtype = codes, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if hasattr(self.codes, "embed_rows"):  # integer_kernels.Q6KLinear: rows read from its own layout
            return self.codes.embed_rows(tokens).to(self.dtype)
        rows = self.codes.qweight[tokens].to(self.dtype)
        return rows * self.codes.scale[tokens].to(self.dtype)[..., None]

    @property
    def weight(self) -> torch.Tensor:
        """For code that reads the embedding's device and dtype (RoPE tables, caches): a 1-element tensor."""
        if not hasattr(self.codes, "scale"):
            return torch.zeros(1, dtype=self.dtype, device=self.codes.packed.device)
        return self.codes.scale[:1].to(self.dtype)


# The output head's format per mode. int4 keeps the head in int8: on the default model (GGUF head: Q8_0)
# a 4-bit head raised perplexity 7.92 -> 8.48 (+7.1%) against 7.96 (+0.5%) with int8, and the int8 head
# doubles as the embedding table, so the model is smaller too (95 MB vs 113 MB); it reads ~14 MB more a token.
HEAD_MODE = {"int8": "int8", "int4": "int8"}


def quantize_model(model: nn.Module, mode: str) -> None:
    """Replace every projection, the output head and the token embedding by quantized forms, in place.

    The embedding becomes int8 rows (a lookup reads one row per token: the codes cost memory, not
    time); with tied embeddings it shares the int8 head's codes, so the model holds one copy.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # one quantized matmul for q/k/v and one for gate/up: a decode step's kernels are short, so
        # fewer calls save time (2 threads: q, k, v 98 -> 53 us a layer; gate, up 147 -> 122 us)
        fuse_layer(layer)  # a layer at a time: one layer's float copy lives beside the model at once
        bias = None if attn.qkv_bias is None else nn.Parameter(attn.qkv_bias, requires_grad=False)
        attn.qkv_proj = quantized_linear(attn.qkv_weight, bias, mode)
        mlp.gate_up_proj = quantized_linear(mlp.gate_up_weight, None, mode)
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        attn.qkv_weight = attn.qkv_bias = mlp.gate_up_weight = None
        attn.o_proj = quantized_linear(attn.o_proj.weight.data, attn.o_proj.bias, mode)
        mlp.down_proj = quantized_linear(mlp.down_proj.weight.data, mlp.down_proj.bias, mode)
    embed, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is embed.weight
    model.lm_head = quantized_linear(head.weight.data, head.bias, HEAD_MODE[mode])
    codes = model.lm_head if tied and isinstance(model.lm_head, Int8Linear) else Int8Linear(embed.weight.data)
    model.model.embed_tokens = Int8Embedding(codes, embed.weight.dtype)
    # What stays float (norms, biases) may still view the loader's memory-mapped checkpoint, which would
    # keep every page of the file resident once quantizing has read them all: copy it out (about halves
    # the resident size after loading int4: docs/performance.md, "Bytes per token and resident memory").
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


@contextlib.contextmanager
def one_thread():
    """Run a block on one intra-op thread. Quantizing at load is a few memory-bound passes per matrix;
    with the cores shared, OpenMP's second thread stalls every op on its barrier (10x slower on 2 busy
    cores: docs/performance.md, "torch.compile and threads")."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def module_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def int4_linear_from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           bias: torch.Tensor | None = None, group_size: int = INT4_GROUP) -> Int4Linear:
    """An Int4Linear from 0..15 codes [N, K] and per-group scale and zero [N, K/g] (float32) given
    directly, not found by quantize_int4: weights that already are such codes (a GGUF Q4 block is
    scale d, zero m + 8d) load without a float round trip, and with the buffers Int4Linear(weight) builds."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [K/g, N, 2]: the kernel's layout
    return int4_linear_from_packed(packed, scale_zero.contiguous().to(ACT_DTYPE), codes.shape[1], bias)


def int4_linear_from_packed(qweight: torch.Tensor, scale_zero: torch.Tensor, in_features: int,
                            bias: torch.Tensor | None = None) -> Int4Linear:
    """An Int4Linear around buffers already in the kernel's layout (packed codes, bf16 [K/g, N, 2] scale and
    zero), e.g. read back from layout_cache.py: nothing is computed, the tensors are held as they are."""
    linear = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(linear)
    linear.out_features, linear.in_features = scale_zero.shape[1], in_features
    linear.group_size = in_features // scale_zero.shape[0]
    linear.register_buffer("qweight", qweight)
    linear.register_buffer("scale_zero", scale_zero)
    linear.bias = bias
    return linear


def int8_linear_from_codes(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """An Int8Linear from quantize_int8's codes and per-row scales, e.g. computed a block of rows at a
    time: its rows are independent, so the result is Int8Linear(weight)'s without the whole float weight."""
    linear = Int8Linear.__new__(Int8Linear)
    nn.Module.__init__(linear)
    linear.out_features, linear.in_features = q.shape
    linear.register_buffer("qweight", q)
    linear.register_buffer("scale", scale)
    linear.bias = bias
    return linear
