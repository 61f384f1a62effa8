"""arbor's CPU integer kernels (backends/arbor_torch/integer_kernels.cpp): Q4_K, Q5_0, Q6_K and Q8_0 codes x int8
activations and int8 rows x int8 activations, on every instruction set this CPU has (AVX512-VNNI, AVX2, plain C++).

Two references: the exact product of the float weights (the project's own bit-exact dequantization) and the
activation as the kernel rounds it. Against the second only float32 summation order differs; against the first,
the stated tolerance is the activations' rounding: |x - dx * round(x / dx)| <= dx / 2 per input, dx = max|x| / 127
over its 32, so |y - x @ W.T| <= (dx / 2) @ |W|.T.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import random_kept_blocks

from arbor_weights import quantized

torch = pytest.importorskip("torch")
from arbor_torch import integer_kernels  # noqa: E402

if not integer_kernels.available():
    pytest.skip("arbor's integer kernels do not build here (no C++ compiler?)", allow_module_level=True)

PARTS = ("qweight", "super_scales", "sub_scales")
ISAS = [name for name in integer_kernels.ISAS if integer_kernels.use_isa(name) == name]
integer_kernels.use_isa("avx512")  # the best this CPU has, as a process starts


@pytest.fixture(params=ISAS)
def isa(request):
    integer_kernels.use_isa(request.param)
    yield request.param
    integer_kernels.use_isa("avx512")


def q4_k_entries(rows: int, columns: int, seed: int = 0) -> dict[str, np.ndarray]:
    data = random_kept_blocks("Q4_K", rows, columns // 256, seed)
    return quantized.from_gguf_blocks(data, "Q4_K", (rows, columns))


def q6_k_entries(rows: int, columns: int, seed: int = 0) -> dict[str, np.ndarray]:
    data = random_kept_blocks("Q6_K", rows, columns // 256, seed)
    return quantized.from_gguf_blocks(data, "Q6_K", (rows, columns))


def rounded_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx * qx as the kernel sees x, dx / 2 per input): per 32 inputs, dx = max|x| / 127, round half to even."""
    blocks = x.double().view(x.shape[0], -1, 32)
    dx = (blocks.float().abs().amax(-1, keepdim=True) / 127).double()
    q = torch.where(dx > 0, torch.round(blocks.float() * (127 / blocks.float().abs().amax(-1, keepdim=True))), 0)
    return (q.double() * dx).view(x.shape), (dx / 2).expand_as(blocks).reshape(x.shape)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    w = w.double()
    seen, half_step = rounded_activations(x)
    scale = seen.abs() @ w.abs().T  # the size of the sum, for float32's rounding of it
    assert torch.all((y.double() - seen @ w.T).abs() <= 1e-5 * scale + 1e-30)
    assert torch.all((y.double() - x.double() @ w.T).abs() <= half_step @ w.abs().T + 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("rows, columns", [(16, 256), (40, 512), (1, 768), (97, 1024)])
def test_the_packed_layout_holds_the_files_q4_k_numbers_exactly(rows, columns):
    entries = q4_k_entries(rows, columns)
    packed = integer_kernels.pack_q4k(entries["qweight"], entries["super_scales"], entries["sub_scales"])
    assert packed.shape == (-(-rows // 16), columns // 256, integer_kernels.SUPER_BYTES)
    linear = integer_kernels.Q4KLinear(packed, rows)
    exact = torch.from_numpy(quantized.dequantize(entries))
    assert torch.equal(linear.dequantized(), exact)  # gguf's dequantization, bit for bit


@pytest.mark.parametrize("rows, columns, tokens", [(16, 256, 1), (40, 512, 1), (33, 768, 3), (1, 256, 5),
                                                   (97, 1536, 7), (200, 512, 17)])
def test_q4k_products_are_the_exact_weights_times_the_rounded_activations(isa, rows, columns, tokens):
    entries = q4_k_entries(rows, columns, seed=rows)
    packed = integer_kernels.pack_q4k(entries["qweight"], entries["super_scales"], entries["sub_scales"])
    x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(columns))
    x[0, :32] *= 50  # one block of large activations: its neighbours' scale is not theirs
    y = torch.ops.arbor.q4k_mm(x, packed, rows)
    assert y.shape == (tokens, rows) and y.dtype == torch.float32
    check(y, x, torch.from_numpy(quantized.dequantize(entries)))


@pytest.mark.parametrize("rows, columns", [(16, 256), (40, 512), (1, 768), (97, 1024)])
def test_the_q6_k_layout_holds_the_files_numbers_exactly_and_serves_rows(rows, columns):
    entries = q6_k_entries(rows, columns)
    linear = integer_kernels.Q6KLinear(integer_kernels.pack_q6k(*(entries[s] for s in PARTS)), rows)
    exact = torch.from_numpy(quantized.dequantize(entries))
    assert linear.packed.shape == (-(-rows // 16), columns // 256, integer_kernels.Q6K_SUPER_BYTES)
    assert torch.equal(linear.dequantized(), exact)
    tokens = torch.tensor([[0, rows - 1], [rows // 2, 3 % rows]])
    assert torch.equal(linear.embed_rows(tokens), exact[tokens])


@pytest.mark.parametrize("rows, columns, tokens", [(16, 256, 1), (40, 512, 1), (33, 768, 3), (97, 1536, 7),
                                                   (200, 512, 17)])
def test_q6k_products_are_the_exact_weights_times_the_rounded_activations(isa, rows, columns, tokens):
    entries = q6_k_entries(rows, columns, seed=rows)
    packed = integer_kernels.pack_q6k(*(entries[s] for s in PARTS))
    x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(columns))
    x[0, 16:48] *= 50
    y = torch.ops.arbor.q6k_mm(x, packed, rows)
    check(y, x, torch.from_numpy(quantized.dequantize(entries)))


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0"])
@pytest.mark.parametrize("rows, columns, tokens", [(16, 256, 1), (40, 96, 3), (97, 768, 5), (200, 512, 17)])
def test_q5_and_q8_hold_the_files_numbers_and_their_products_are_the_exact_weights_times_the_rounded_activations(
        isa, kind, rows, columns, tokens):
    block = quantized.BLOCK_BYTES[kind][0]
    entries = quantized.from_gguf_blocks(random_kept_blocks(kind, rows, columns // block, rows), kind, (rows, columns))
    five = kind == "Q5_0"
    assert integer_kernels.fits_five_bits(entries["qweight"]) == five
    kept = (integer_kernels.pack_q5 if five else integer_kernels.pack_q8)(entries["qweight"], entries["scales"])
    linear = (integer_kernels.Q5Linear if five else integer_kernels.Q8Linear)(kept, rows)
    assert kept.shape[2] == (integer_kernels.Q5_BLOCK_BYTES if five else integer_kernels.Q8_BLOCK_BYTES)
    exact = torch.from_numpy(quantized.dequantize(entries))
    assert torch.equal(linear.dequantized(), exact)
    picked = torch.tensor([[0, rows - 1], [rows // 2, 3 % rows]])
    assert torch.equal(linear.embed_rows(picked), exact[picked])
    x = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(columns))
    x[0, 32:64] *= 50
    check(linear(x), x, exact)


@pytest.mark.parametrize("rows, columns", [(16, 512), (37, 256)])
def test_q4_k_rows_serve_as_an_embedding_exactly(rows, columns):
    entries = q4_k_entries(rows, columns)
    linear = integer_kernels.Q4KLinear(integer_kernels.pack_q4k(*(entries[s] for s in PARTS)), rows)
    picked = torch.tensor([[0, rows - 1], [5, 9]])
    assert torch.equal(linear.embed_rows(picked), torch.from_numpy(quantized.dequantize(entries))[picked])


@pytest.mark.parametrize("rows, columns, tokens", [(7, 96, 5), (40, 512, 1), (33, 1024, 3), (129, 160, 9),
                                                   (5, 32, 2)])
def test_int8_row_products_are_the_exact_weights_times_the_rounded_activations(isa, rows, columns, tokens):
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (rows, columns), dtype=torch.int8, generator=generator)
    scale = (torch.rand(rows, generator=generator) * 0.01).to(torch.bfloat16)
    x = torch.randn(tokens, columns, generator=generator)
    y = torch.ops.arbor.i8_mm(x, q, scale)
    check(y, x, q.double() * scale.double()[:, None])


def test_every_instruction_set_gives_the_same_products_up_to_float_rounding():
    entries = q4_k_entries(48, 1024)
    packed = integer_kernels.pack_q4k(entries["qweight"], entries["super_scales"], entries["sub_scales"])
    x = torch.randn(6, 1024, generator=torch.Generator().manual_seed(3))
    six = q6_k_entries(48, 1024)
    packed6 = integer_kernels.pack_q6k(*(six[s] for s in PARTS))
    out = {}
    for name in ISAS:
        integer_kernels.use_isa(name)
        out[name] = (torch.ops.arbor.q4k_mm(x, packed, 48), torch.ops.arbor.q6k_mm(x, packed6, 48))
    integer_kernels.use_isa("avx512")
    for ys in out.values():
        for y, ref in zip(ys, out["scalar"]):
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bfloat16_inputs_and_leading_dimensions_are_taken_as_they_come():
    entries = q4_k_entries(32, 512)
    packed = integer_kernels.pack_q4k(entries["qweight"], entries["super_scales"], entries["sub_scales"])
    linear = integer_kernels.Q4KLinear(packed, 32)
    x = torch.randn(2, 3, 512).to(torch.bfloat16)
    y = linear(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.ops.arbor.q4k_mm(x.reshape(6, 512), packed, 32).view(2, 3, 32).bfloat16())


def test_a_wrong_layout_is_one_clear_error():
    with pytest.raises(RuntimeError, match="q4k_mm"):
        torch.ops.arbor.q4k_mm(torch.randn(1, 256), torch.zeros(1, 1, 100, dtype=torch.uint8), 16)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.arbor.i8_mm(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))
