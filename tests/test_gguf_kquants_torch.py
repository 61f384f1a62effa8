"""K-quant and Q5_0 checkpoints in torch's CPU int4 mode (backends/arbor_torch/load_quantized.py): Q4_K
layers from their codes, the 8-bit kinds as int8 rows, mixed fusions (Q4_K_M's Q6_K v beside Q4_K q, k),
the CPU default, the compiled decode step, and the two real Qwen files when they are here.

Bounds are stated against the exact float path (--dtype float32, bit-identical to gguf's dequantize). Tiny
models are written at scale 0.02 (a real model's weight size): unscaled random weights make logits so
chaotic that even the bfloat16 float path is 30% off.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf_files import Q, random_kept_blocks, real_gguf, write_tiny_gguf

import arbor_weights
from arbor_weights import quantized

torch = pytest.importorskip("torch")
from arbor_torch import integer_kernels, load_quantized  # noqa: E402
from arbor_torch.quantize import Int4Linear, Int8Linear, StackedLinear, int4_linear_from_codes, unpack_int4_cpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("arbor_home")
MIX = {"v_proj": Q.Q6_K, "down_proj": Q.Q6_K, "embed_tokens": Q.Q8_0}  # Q4_K_M's pattern (its other layers Q4_K)
BF16_STEP = 2.0 ** -8  # a bfloat16 rounding moves a number by at most 2^-9 of it; twice that, for margin


@pytest.fixture
def aten_kernels(monkeypatch):
    """PyTorch's int4 / int8 kernels, as where arbor's integer kernels do not build: the int4 mode's forms."""
    monkeypatch.setattr(integer_kernels, "_loaded", False)


def import_tiny(tmp_path, qtype=Q.Q4_K, kinds=None):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, kinds=kinds, arch="qwen2", bias=True, scale=0.02)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    return arbor_weights.open_checkpoint(tmp_path / "out")


def torch_lm(checkpoint, quantize=None, dtype="float32"):
    from arbor_core.rope import rope_frequencies
    from arbor_torch.runner import TorchModel

    lm = TorchModel.from_checkpoint(checkpoint, "cpu", dtype, quantize=quantize)
    lm.set_rope(rope_frequencies(checkpoint.config), 512)
    return lm


def distance(got: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """(max |diff| / max |logit|, relative norm, top-1 agreement) of teacher-forced logits."""
    diff = np.abs(got - exact)
    return (float(diff.max() / np.abs(exact).max()), float(np.linalg.norm(got - exact) / np.linalg.norm(exact)),
            float(np.mean(got.argmax(-1) == exact.argmax(-1))))


# ---- one layer: Q4_K's codes, the 8-bit kinds' rows ------------------------------------------------

def q4_k_spanning(rows: int, blocks: int) -> np.ndarray:
    """Q4_K blocks whose every 32 holds codes 0 and 15 and has a scale sc > 0 (then quantize_int4 on their
    floats finds the same scale and codes), with realistic d and dmin."""
    data = random_kept_blocks("Q4_K", rows, blocks).reshape(rows, blocks, 144)
    data[..., 0:4] = np.random.default_rng(1).uniform(1e-4, 1e-3, (rows, blocks, 2)).astype(np.float16).view(np.uint8)
    data[..., 4:8] |= 1  # sub-blocks 0-3: the scale's lowest bit
    data[..., 12:16] |= 1  # sub-blocks 4-7: the same
    runs = data[..., 16:144].reshape(rows, blocks, 4, 32)
    runs[..., 0], runs[..., 1] = 0xF0, 0x0F  # element 0: 0 in sub-block 2c, 15 in 2c + 1; element 1 the reverse
    data[..., 16:144] = runs.reshape(rows, blocks, 128)
    return data.reshape(rows, -1)


def test_int4_from_q4_k_codes_is_quantize_int4_of_the_exact_weights_where_each_32_spans_the_codes():
    entries = quantized.from_gguf_blocks(q4_k_spanning(128, 2), "Q4_K", (128, 512))
    ours = int4_linear_from_codes(*load_quantized.int4_parts(entries))
    theirs = Int4Linear(torch.from_numpy(quantized.dequantize(entries)))
    assert torch.equal(unpack_int4_cpu(ours.qweight, 128, 512), unpack_int4_cpu(theirs.qweight, 128, 512))
    # scale: (max - min) / 15 against d * sc, one rounding apart; zero: 8 * that - dmin * m, the same
    a, b = ours.scale_zero.float(), theirs.scale_zero.float()
    assert torch.all((a - b).abs() <= BF16_STEP * (b.abs() + b[..., :1].abs()))


def test_int4_from_q4_k_codes_is_the_file_up_to_the_kernels_bfloat16_scale_and_zero():
    entries = quantized.from_gguf_blocks(random_kept_blocks("Q4_K", 64, 3), "Q4_K", (64, 768))
    codes, scale, zero = load_quantized.int4_parts(entries)
    linear = int4_linear_from_codes(codes, scale, zero)
    exact = torch.from_numpy(quantized.dequantize(entries)).view(64, 24, 32)
    bound = BF16_STEP * (8 * scale.abs() + zero.abs())[..., None]  # |q - 8| <= 8 times the scale's rounding
    assert torch.all((linear.dequantized(torch.float32).view(64, 24, 32) - exact).abs() <= bound)


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_K", "Q6_K", "Q8_0"])
def test_eight_bit_kinds_run_as_int8_rows_within_half_a_row_step(kind, monkeypatch):
    block = quantized.BLOCK_BYTES[kind][0]
    entries = quantized.from_gguf_blocks(random_kept_blocks(kind, 40, 1024 // block), kind, (40, 1024))
    monkeypatch.setattr(load_quantized, "INT8_ROWS", 16)  # rows a block at a time: the same as all at once
    loader = load_quantized.BlockLoader({f"w.{s}": torch.from_numpy(a) for s, a in entries.items()},
                                        torch.float32, "test")
    linear = loader.int8_linear(["w"])
    exact = torch.from_numpy(quantized.dequantize(entries))
    assert isinstance(linear, Int8Linear) and torch.equal(linear.qweight, Int8Linear(exact).qweight)
    rows = exact.abs().amax(dim=1, keepdim=True)
    assert torch.all((linear.qweight * linear.scale.float()[:, None] - exact).abs() <= rows / 254 * (1 + BF16_STEP))


# ---- whole tiny models ------------------------------------------------------------------------------

CASES = {"Q4_K": (Q.Q4_K, None), "Q5_K": (Q.Q5_K, None), "Q5_0": (Q.Q5_0, None), "Q4_K_M mix": (Q.Q4_K, MIX),
         "Q6_K": (Q.Q6_K, None)}


@pytest.mark.parametrize("kernels", ["arbor", "aten"])
@pytest.mark.parametrize("case", CASES)
def test_a_tiny_k_quant_gguf_in_int4_mode_is_close_to_the_float_path(tmp_path, case, kernels, monkeypatch):
    """Stated bound: relative norm of the logits < 0.03 and top-1 >= 94% of 60 positions; Q6_K's random
    sub-scales of both signs up to 127 (a real file's are far more even) are the per-row scale's worst
    case: < 0.1 and >= 90% there. The bfloat16 float path alone is 0.002-0.04 off on these models.
    Measured with arbor's integer kernels (exact weights, int8 activations per 32; norm, top-1): Q4_K 0.0012,
    100%; Q5_K 0.0010, 100%; Q4_K_M mix 0.012, 98.3%; Q6_K 0.049, 93.3%; with PyTorch's: 0.0018, 0.0018, 0.011
    (95%), 0.067 (95%)."""
    if kernels == "aten":
        monkeypatch.setattr(integer_kernels, "_loaded", False)
    checkpoint = import_tiny(tmp_path, *CASES[case])
    ids = list(range(3, 63))
    exact = torch_lm(checkpoint).logits(ids)
    _, norm, top1 = distance(torch_lm(checkpoint, "int4").logits(ids), exact)
    bound, agreement = (0.1, 0.9) if case == "Q6_K" else (0.03, 0.94)
    assert norm < bound and top1 >= agreement


def test_four_bit_kinds_as_int8_rows_stay_within_the_float_paths_bound(tmp_path, monkeypatch, aten_kernels):
    """The prefill alternative FOUR_BIT_FORMAT = "int8": every Q4_K layer int8 rows, over 96 rows (a bf16
    GEMM, not the row kernel). Stated bound: relative norm < 0.03 (as the int4 mode's test above) and top-1
    >= 85%: at 96 rows this random model's top-1 is fragile for both forms (measured: int4 codes 0.0115 and
    89.6%, int8 rows 0.0115 and 88.5%; at 60 rows 93-95%)."""
    monkeypatch.setattr(load_quantized, "FOUR_BIT_FORMAT", "int8")
    checkpoint = import_tiny(tmp_path, *CASES["Q4_K_M mix"])
    ids = list(range(3, 99))
    lm = torch_lm(checkpoint, "int4")
    layer = lm.model.model.layers[0]
    assert all(isinstance(m, Int8Linear) for m in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj))
    _, norm, top1 = distance(lm.logits(ids), torch_lm(checkpoint).logits(ids))
    assert norm < 0.03 and top1 >= 0.85


@pytest.mark.parametrize("case", ["Q5_0", "Q4_K_M mix", "Q6_K"])
def test_eight_bit_kinds_are_closer_to_the_file_as_int8_rows_than_re_fitted_to_int4(tmp_path, case, monkeypatch,
                                                                                   aten_kernels):
    checkpoint = import_tiny(tmp_path, *CASES[case])
    ids = list(range(3, 63))
    exact = torch_lm(checkpoint).logits(ids)
    rows = distance(torch_lm(checkpoint, "int4").logits(ids), exact)
    monkeypatch.setattr(load_quantized, "EIGHT_BIT_FORMAT", "float")  # as before: int4 groups from the floats
    groups = distance(torch_lm(checkpoint, "int4").logits(ids), exact)
    assert rows[1] < groups[1] / 2


def test_a_mixed_fusion_keeps_each_kind_in_its_own_kernel(tmp_path, aten_kernels):
    checkpoint = import_tiny(tmp_path, kinds=MIX)
    layer = torch_lm(checkpoint, "int4").model.model.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, StackedLinear) and [type(p) for p in qkv.parts] == [Int4Linear, Int8Linear]
    assert (qkv.parts[0].out_features, qkv.parts[1].out_features, qkv.out_features) == (384, 128, 512)
    assert isinstance(layer.mlp.gate_up_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(layer.self_attn.o_proj, Int4Linear)
    # the Q4_K part holds the file's q and k codes, untouched
    from safetensors.numpy import load_file

    state = load_file(checkpoint.weight_files[0])
    file_codes = np.concatenate([quantized.unpack_nibbles(state[f"model.layers.1.self_attn.{x}_proj.qweight"])
                                 for x in "qk"])
    assert np.array_equal(unpack_int4_cpu(qkv.parts[0].qweight, 384, 256).numpy(), file_codes)
    # and the stacked output is what each projection alone gives, with its bias
    x = torch.randn(3, 256)
    loader = load_quantized.BlockLoader({k: torch.from_numpy(v) for k, v in state.items()}, torch.float32, "test")
    alone = [loader.projection([f"model.layers.1.self_attn.{p}_proj"])(x) for p in "qkv"]
    torch.testing.assert_close(qkv(x), torch.cat(alone, dim=-1), rtol=0, atol=0)


@pytest.mark.skipif(not integer_kernels.available(), reason="arbor's integer kernels do not build here")
def test_on_the_integer_kernels_every_k_quant_layer_is_the_files_own_numbers(tmp_path):
    """Q4_K as Q4KLinear, Q6_K (v, down, the tied head and embedding) as Q6KLinear, Q8_0 as int8 rows on i8_mm;
    their weights the exact dequantization, bit for bit."""
    from safetensors.numpy import load_file

    checkpoint = import_tiny(tmp_path, kinds=MIX)
    lm = torch_lm(checkpoint, "int4")
    layer = lm.model.model.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert [type(p) for p in qkv.parts] == [integer_kernels.Q4KLinear, integer_kernels.Q6KLinear]
    assert isinstance(layer.mlp.gate_up_proj, integer_kernels.Q4KLinear)
    assert isinstance(layer.mlp.down_proj, integer_kernels.Q6KLinear)
    state = load_file(checkpoint.weight_files[0])
    exact = {name: quantized.dequantize({s: state[f"model.layers.1.{name}.{s}"] for s in quantized.SUFFIXES
                                         if f"model.layers.1.{name}.{s}" in state})
             for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert np.array_equal(qkv.parts[0].dequantized().numpy(),
                          np.concatenate([exact["self_attn.q_proj"], exact["self_attn.k_proj"]]))
    assert np.array_equal(qkv.parts[1].dequantized().numpy(), exact["self_attn.v_proj"])
    assert np.array_equal(layer.mlp.down_proj.dequantized().numpy(), exact["mlp.down_proj"])
    embed = lm.model.model.embed_tokens
    if checkpoint.config.tie_word_embeddings:
        assert embed.codes is lm.model.lm_head
    assert isinstance(embed.codes, integer_kernels.Q8Linear)  # MIX's embedding: Q8_0, its exact rows
    tokens = torch.tensor([[3, 17], [99, 5]])
    assert torch.equal(embed(tokens).float(), embed.codes.dequantized()[tokens])


@pytest.mark.skipif(not integer_kernels.available(), reason="arbor's integer kernels do not build here")
def test_on_the_integer_kernels_nothing_is_dequantized_at_load(tmp_path, monkeypatch):
    checkpoint = import_tiny(tmp_path, kinds=MIX)
    monkeypatch.setattr(quantized, "dequantize", lambda entries: pytest.fail("dequantized at load"))
    torch_lm(checkpoint, "int4")


@pytest.mark.skipif(not integer_kernels.available(), reason="arbor's integer kernels do not build here")
def test_a_q6_k_tied_head_is_also_the_embeddings_exact_rows(tmp_path):
    checkpoint = import_tiny(tmp_path, kinds={**MIX, "embed_tokens": Q.Q6_K})
    lm = torch_lm(checkpoint, "int4")
    head, embed = lm.model.lm_head, lm.model.model.embed_tokens
    assert isinstance(head, integer_kernels.Q6KLinear) and embed.codes is head
    tokens = torch.tensor([[3, 17], [99, 5]])
    assert torch.equal(embed(tokens).float(), head.dequantized()[tokens])


def test_int4_mode_never_dequantizes_a_4_bit_layer(tmp_path, monkeypatch, aten_kernels):
    checkpoint = import_tiny(tmp_path, kinds=MIX)
    dequantized = []
    real = quantized.dequantize
    monkeypatch.setattr(quantized, "dequantize", lambda entries: dequantized.append(entries["qweight"].dtype)
                        or real(entries))
    torch_lm(checkpoint, "int4")
    assert dequantized and set(dequantized) == {np.dtype(np.int8)}  # Q6_K v and down, the Q8_0 embedding


@pytest.mark.parametrize("qtype, default", [(Q.Q4_K, "int4"), (Q.Q5_0, "int4"), (Q.Q6_K, "int4"), (Q.F16, None)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_gguf_block_checkpoints_default_to_int4_mode_on_the_cpu(tmp_path, qtype, default):
    import arbor_torch

    checkpoint = import_tiny(tmp_path, qtype)
    assert arbor_torch.default_quantize(checkpoint, "cpu") == default
    assert arbor_torch.default_quantize(checkpoint, "cuda") is None


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="needs a C++ compiler")
def test_the_compiled_step_runs_a_mixed_k_quant_model(tmp_path, monkeypatch, capfd):
    from arbor_core.backend import SamplingParams

    monkeypatch.setenv("ARBOR_COMPILE", "sync")
    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(tmp_path / "compiled"))
    checkpoint = import_tiny(tmp_path, kinds=MIX)

    def greedy(lm, n=16):
        cache = lm.new_cache(128)
        token = lm.sample(lm.prefill([3, 17, 42, 5, 99], cache, 512), SamplingParams(), None)
        tokens, logits = [token], []
        for _ in range(n):
            logits.append(lm.decode(token, cache).clone())
            token = lm.sample(logits[-1], SamplingParams(), None)
            tokens.append(token)
        return tokens, torch.stack(logits)

    compiled = torch_lm(checkpoint, "int4")
    tokens, logits = greedy(compiled)
    assert compiled.compiled.run is not None, capfd.readouterr().err  # built, passed its check, ran
    monkeypatch.setenv("ARBOR_COMPILE", "0")
    eager_tokens, eager_logits = greedy(torch_lm(checkpoint, "int4"))
    assert tokens == eager_tokens
    assert torch.linalg.norm(logits - eager_logits) <= 0.02 * torch.linalg.norm(eager_logits)


# ---- the real files -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, weights_bytes", [("qwen2.5-coder-0.5b-instruct", 0.65e9),
                                                 ("qwen2.5-coder-1.5b-instruct", 1.4e9)])
def test_the_real_files_in_int4_mode_are_within_the_stated_bound_of_the_exact_weights(name, weights_bytes, tmp_path):
    """Teacher-forced over 256 tokens of argparse's docstring (prose and code): max |diff| / max |logit| < 0.06
    past the first position, < 0.15 at it, relative norm < 0.03 and top-1 >= 94%. Measured over 384 tokens of
    README.md on arbor's integer kernels (max past position 0, at it, norm, top-1): 0.5B 0.017, 0.017, 0.014,
    97.7%; 1.5B 0.015, 0.114, 0.013, 99.0%; PyTorch's kernels: 0.026-0.042 max, 96-97%. The first position is
    Qwen's attention sink, a few channels of its hidden state ~1000x the rest: the int8 activation block holding
    one of them rounds its 31 neighbours to zero (llama.cpp's Q8_K blocks of 256 do the same)."""
    import argparse

    from arbor_core.tokenizer import load_tokenizer

    arbor_weights.import_gguf(real_gguf(name), tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    ids = load_tokenizer(checkpoint.path).encode(argparse.__doc__)[:256]
    exact = torch_lm(checkpoint).logits(ids)  # 6 GB of float32 for the 1.5B, freed before int4 mode loads
    lm = torch_lm(checkpoint, "int4")
    assert lm.weights_nbytes < weights_bytes and lm.compiled is not None  # the default's form, compiled step on
    got = lm.logits(ids)
    worst, norm, top1 = distance(got[1:], exact[1:])
    assert worst < 0.06 and norm < 0.03 and top1 >= 0.94
    assert distance(got[:1], exact[:1])[0] < 0.15
