"""A checkpoint's GGUF blocks as MLX quantized layers: the file's codes run by mx.quantized_matmul, no float copy.

MLX's affine quantization holds w[r, c] = scales[r, g] * code[r, c] + biases[r, g] (g = c // group) with
unsigned codes of 2..8 bits packed little-endian into uint32 words, groups of 32 or more inputs (16 is
refused), and float32 scales if asked. Every kept GGUF type (arbor_weights/quantized.py) maps onto it
without a float round trip, the codes repacked as integers and the block constants formed as gguf forms
them (float32, in its order), so mx.dequantize of a layer equals quantized.dequantize (gguf's values) value
for value, and bit for bit but for a zero's sign (gguf's d * 0 is -0.0 where d < 0; d * q - d * q is +0.0):
  Q4_0   its nibbles as they are, 4 bits          scale d        bias -8d
  Q4_1   its nibbles as they are, 4 bits          scale d        bias m
  Q8_0 (and Q5_0, stored as Q8_0)                 scale d        bias -offset * d
         the int8 codes q + offset, in the fewest bits of 4/5/6/8 that hold the tensor's code range
         (a Q5_0 tensor's -16..15: 5 bits; Q8_0's: 8)
  Q4_K   its nibbles, 4 bits                      scale d * sc   bias -(dmin * m)
  Q5_K   its codes 0..31 (5 bits, 4 if they fit)  scale d * sc   bias -(dmin * m)
  Q6_K   see _q6_k: two 6-bit matrices that sum to the weight
The products are exact in float32 (d has 11 significant bits, sc 8, a code 8): scale * code + bias
rounds once, as gguf's does. The scales and biases stay float32 in every model dtype (d * sc is not
float16-exact; _Blocks says what bfloat16 ones cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx import nn

from arbor_weights import quantized

GROUP = quantized.GROUP_SIZE  # 32 inputs share a scale and bias: every kept type's (Q6_K's two halves aside)
MLX_BITS = (4, 5, 6, 8)  # code widths tried for int8 codes, fewest first (MLX's 2 and 3 would fit no real tensor)


@dataclass
class AffineBlocks:
    """One weight in MLX's affine layout: `parts` [N, K] matrices stacked as rows, summing to the weight."""
    weight: np.ndarray  # uint32 [parts * N, K * bits / 32]
    scales: np.ndarray  # float32 [parts * N, K / 32]
    biases: np.ndarray  # float32 [parts * N, K / 32]
    bits: int
    parts: int = 1


def affine_blocks(entries: dict[str, np.ndarray]) -> AffineBlocks:
    """A quantized tensor's entries (numpy) as MLX's affine blocks, exactly."""
    kind = quantized.kind_of(entries)
    return _CONVERTERS[kind](entries)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes uint8 [N, K] (< 2**bits) -> MLX's packing: a row's codes as one little-endian bit
    stream of `bits` each, read as uint32 words [N, K * bits / 32]."""
    n, k = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    per = 8 // np.gcd(bits, 8)  # codes that fill whole bytes: 2 of 4 bits, 4 of 6, 8 of 5
    runs = codes.reshape(n, k // per, per)
    packed = np.zeros((n, k // per, per * bits // 8), np.uint8)
    for i in range(per):  # code i's bits start at bit i * bits of its run: the low ones in one byte, any rest in the next
        byte, shift = divmod(i * bits, 8)
        packed[..., byte] |= runs[..., i] << np.uint8(shift)  # uint8: the bits past the byte fall off
        if shift + bits > 8:
            packed[..., byte + 1] |= runs[..., i] >> np.uint8(8 - shift)
    return packed.reshape(n, -1).view(np.uint32)


def _code_width(low: int, high: int) -> int:
    """The fewest MLX bits holding codes low..high once shifted to start at 0."""
    return next(bits for bits in MLX_BITS if high - low < 1 << bits)


def _constants(entries) -> np.ndarray:
    return np.asarray(entries["scales"]).astype(np.float32)


def _nibbles(entries) -> np.ndarray:
    """A 4-bit qweight (column 2j in byte j's low nibble) is MLX's 4-bit packing already: its bytes as words."""
    return np.ascontiguousarray(entries["qweight"]).view(np.uint32)


def _q4_0(entries) -> AffineBlocks:
    d = _constants(entries)
    return AffineBlocks(_nibbles(entries), d, d * np.float32(-8), 4)


def _q4_1(entries) -> AffineBlocks:
    return AffineBlocks(_nibbles(entries), _constants(entries), np.asarray(entries["biases"]).astype(np.float32), 4)


def _shifted(codes: np.ndarray, zero: bool = False) -> tuple[np.ndarray, int, int]:
    """int8 codes -> (uint8 codes - their minimum, that minimum, the bits they need); `zero`: a code for 0
    is kept in range even where the tensor has none."""
    low, high = int(codes.min()), int(codes.max())
    low, high = (min(low, 0), max(high, 0)) if zero else (low, high)
    return codes.view(np.uint8) - np.uint8(low & 0xFF), low, _code_width(low, high)  # uint8 wraps: exact


def _q8_0(entries) -> AffineBlocks:
    """w = d * q = d * (q - low) + low * d: every term exact, so the sum rounds to d * q itself."""
    codes, low, bits = _shifted(np.asarray(entries["qweight"]))
    d = _constants(entries)
    return AffineBlocks(pack_codes(codes, bits), d, d * np.float32(low), bits)


def _k_scales(entries) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's per-32 float32 (d * sc, -(dmin * m)), formed as gguf forms them: [N, K/32] each."""
    scale, low = quantized.k_block_constants(entries)
    return scale, -low


def _q4_k(entries) -> AffineBlocks:
    scale, bias = _k_scales(entries)
    return AffineBlocks(_nibbles(entries), scale, bias, 4)


def _q5_k(entries) -> AffineBlocks:
    """Codes 0..31 unshifted (a shift would add a term to the bias and round differently)."""
    codes = np.asarray(entries["qweight"]).view(np.uint8)
    bits = _code_width(0, int(codes.max()))
    scale, bias = _k_scales(entries)
    return AffineBlocks(pack_codes(codes, bits), scale, bias, bits)


def _q6_k(entries) -> AffineBlocks:
    """Q6_K scales every 16 inputs (d * sc); MLX's groups are 32 or more. Kept exact as two 6-bit [N, K]
    matrices: the first holds each 32's first 16 codes (scale d * sc of that 16) and codes for 0 in its
    last 16, the second the other way round; their sum is the weight exactly (w + 0), and a layer runs
    them as one [2N, K] quantized_matmul whose two halves it adds. 16 bits a weight with float32 scales,
    half of float32's. The one-matrix alternatives, measured on every Q6_K tensor of the two Qwen files
    (12 ffn_down of the 0.5B; 28 ffn_down / attn_v and the 151,936-row head of the 1.5B), 0.5B / 1.5B:
      - 8 bits, each 32 re-quantized min-max (10 bits a weight): max |error| / max |w| 3.8e-3 / 5.2e-3,
        rms error / rms w 4.8e-3 / 4.8e-3; the 0.5B's logits on 100 tokens of text then differ from
        torch's exact float32 ones by 3.5e-3 of max |logit| (with the pair: 2.1e-6, float rounding);
      - 8 bits, scale d * sc / 4 of the larger-scale 16 (it exact, the other rounded to that step):
        3.9e-3 / 4.0e-3, rms 4.0e-3 / 3.9e-3;
      - 8 bits exact where the two 16s of a 32 share sc: 1.3% / 1.0% of the 32s do;
      - float weights: exact, 32 bits a weight in float32.
    The file's own values are the contract, so the pair."""
    scale16, _ = quantized.k_block_constants(entries)
    n = scale16.shape[0]
    scale16 = scale16.reshape(n, -1, 2)  # [N, K/32, (first 16, last 16)]
    codes, low, bits = _shifted(np.asarray(entries["qweight"]), zero=True)
    zero = np.uint8(-low)  # the shifted code of 0
    halves = codes.reshape(n, -1, 2, 16)
    first, second = halves.copy(), halves.copy()
    first[:, :, 1], second[:, :, 0] = zero, zero
    scales = np.concatenate([scale16[..., 0], scale16[..., 1]])
    weight = pack_codes(np.concatenate([first, second]).reshape(2 * n, -1), bits)
    return AffineBlocks(weight, scales, scales * np.float32(low), bits, parts=2)


_CONVERTERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# ---- the layers that run them ---------------------------------------------------------------------

class _Blocks(nn.Module):
    """An AffineBlocks weight as MLX arrays, its constants float32 whatever the model's dtype: in bfloat16
    the bias of codes shifted by 128 (-128 d) would carry an error of d / 4, and the scale times a code
    of 255 one of d / 2: measured on tiny random Q8_0 / Q4_1 models, bfloat16 constants put the logits
    0.89 / 0.70 of max |logit| from the float32 model's, where bfloat16 float weights put them 0.20 / 0.22
    (these float32 ones: 0.20 / 0.19; such models amplify any rounding). So MLX dequantizes in float32 (x promoted: the exact weights,
    float32 sums) and a 16-bit model gets its `dtype` back from each layer."""

    def __init__(self, blocks: AffineBlocks, dtype: mx.Dtype):
        super().__init__()
        self.weight = mx.array(blocks.weight)
        self.scales, self.biases = mx.array(blocks.scales), mx.array(blocks.biases)
        self.bits, self.parts, self.dtype = blocks.bits, blocks.parts, dtype
        self.rows = blocks.weight.shape[0] // blocks.parts  # N: the weight's output rows

    def num_weights(self) -> int:
        return self.rows * self.weight.shape[1] * 32 // self.bits

    def matmul(self, x: mx.array) -> mx.array:
        """x @ w.T in the model's dtype, the parts' products added."""
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True, group_size=GROUP,
                                bits=self.bits)
        y = y if self.parts == 1 else y[..., :self.rows] + y[..., self.rows:]
        return y.astype(self.dtype)


class BlockLinear(_Blocks):
    """nn.Linear over GGUF blocks (mlx's QuantizedLinear, its weight built from codes, not quantized here)."""

    def __init__(self, blocks: AffineBlocks, dtype: mx.Dtype, bias: bool):
        super().__init__(blocks, dtype)
        if bias:
            self.bias = mx.zeros((self.rows,))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul(x)
        return y + self.bias if "bias" in self else y


class BlockEmbedding(_Blocks):
    """nn.Embedding over GGUF blocks: rows dequantized on lookup; `as_linear` is the tied head."""

    def __call__(self, ids: mx.array) -> mx.array:
        rows = [self._rows(ids + part * self.rows) for part in range(self.parts)]
        return rows[0] if self.parts == 1 else rows[0] + rows[1]

    def _rows(self, ids: mx.array) -> mx.array:
        w = mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], group_size=GROUP, bits=self.bits)
        return w.astype(self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul(x)


def install_blocks(model: nn.Module, entries: dict[str, dict[str, mx.array]], dtype: mx.Dtype) -> dict[str, dict]:
    """Replace each Linear / Embedding of `model` that `entries` (base -> {suffix: array}, checked by
    check_tensors) holds quantized with a Block layer of its codes; each tensor's source arrays are
    dropped once converted. Returns the entries of weights that are not a Linear's or an Embedding's."""
    left = {}
    for base in list(entries):
        parent, name = _parent(model, base)
        module = parent[name]
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            left[base] = entries.pop(base)
            continue
        blocks = affine_blocks({suffix: np.asarray(a) for suffix, a in entries.pop(base).items()})
        parent[name] = BlockLinear(blocks, dtype, "bias" in module) if isinstance(module, nn.Linear) \
            else BlockEmbedding(blocks, dtype)
        mx.eval(parent[name].parameters())  # now, so the numpy copies go before the next tensor's are made
    return left


def _parent(model: nn.Module, base: str) -> tuple[nn.Module | list, str | int]:
    """(the container, the key) of the module at a dotted path such as model.layers.3.mlp.down_proj."""
    *path, last = base.split(".")
    node = model
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def num_parameters(model: nn.Module) -> int:
    """The model's weights counted as floats: a Block layer's N * K (its arrays are codes and constants)."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, _Blocks):
            total += module.num_weights() + (module.bias.size if "bias" in module else 0)
        else:
            total += sum(v.size for v in module.values() if isinstance(v, mx.array))
    return total
