"""What only the torch backend has: CUDA, fused projections and the CUDA graph's layer halves.

The contract every backend keeps (cached paths = full forward, ring, int8, sampling, errors) is
tests/test_backend_contract.py; `tiny_model` is a fixture in conftest.py.
"""

import numpy as np
import pytest
import torch

import arbor_torch
from arbor_core.rope import rope_frequencies
from arbor_torch.runner import TorchModel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_float32(tiny_model):
    lm = tiny_model()
    ids = list(range(40))
    ref = lm.logits(ids)
    cuda = TorchModel(lm.model.to("cuda", torch.bfloat16), "cuda", "bfloat16")
    cuda.set_rope(rope_frequencies(lm.config), 256)
    got = cuda.logits(ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_dtype_and_device_defaults():
    assert arbor_torch.default_dtype("cpu") == "float32"
    assert arbor_torch.default_dtype("cuda") == "bfloat16"


def test_fused_projections_keep_the_logits_and_the_parameter_count(tiny_model):
    lm = tiny_model(attention_bias=True)
    ids = list(range(30))
    before, count = lm.logits(ids), lm.num_parameters()
    lm.model.fuse_projections()
    np.testing.assert_allclose(lm.logits(ids), before, rtol=1e-5, atol=1e-5)
    assert lm.num_parameters() == count


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_step_halves_equal_the_block(fused, arch, monkeypatch, tiny_model):
    """The CUDA graph's per-layer math (its family's pre/post attention on the fused weights, as compiled) equals
    Block.forward, for a Llama block and a Gemma one (q/k norms, sandwich norms, GeGLU, its local RoPE); with an
    int8 cache, the new token's K/V come out as cache.quantize_int8 makes them."""
    from test_gemma import TINY_GEMMA

    from arbor_torch.cache import quantize_int8
    from arbor_torch.cuda_graph import layer_halves

    if fused:
        pytest.importorskip("triton")  # torch.compile's CPU backend needs a C++ compiler; skip where absent
    monkeypatch.setenv("ARBOR_COMPILE", "1" if fused else "0")
    gemma = arch == "gemma"
    lm = tiny_model(**TINY_GEMMA) if gemma else tiny_model(attention_bias=True)
    lm.model.fuse_projections()
    cfg = lm.config
    block = lm.model.model.layers[0]
    (pre, post), (pre_int8, _) = layer_halves(block.arch, False), layer_halves(block.arch, True)
    layer = block.arch.layer_of(block, tensors=True)
    x = torch.randn(1, 1, cfg.hidden_size)
    pos = 5
    tables = (lm.model.local_cos, lm.model.local_sin) if gemma else (lm.model.rope_cos, lm.model.rope_sin)
    assert block.self_attn.window == (8 if gemma else None)  # Gemma's first layer slides: its own RoPE tables
    cos, sin = tables[0][pos:pos + 1], tables[1][pos:pos + 1]
    with torch.no_grad():
        cache = lm.new_cache(16)
        ref = block(x, cos, sin, cache.layers[0], 0)[0]  # one token at position 0..: compare at start=0
        q, k, v = pre(x[0], layer, cos, sin)
        y = torch.nn.functional.scaled_dot_product_attention(q[None, :, None], k, v, enable_gqa=True,
                                                             scale=cfg.attention_scale)[0, :, 0]
        out = post(x[0], y.reshape(1, -1), layer)
        quantized = pre_int8(x[0], layer, cos, sin)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)
    expected = (q,) + quantize_int8(k) + quantize_int8(v)
    assert [t.dtype for t in quantized] == [t.dtype for t in expected]
    for got, want in zip(quantized, expected):
        np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=1e-5, atol=1e-5)
    assert hasattr(pre, "_torchdynamo_orig_callable") == fused  # compiled exactly when asked


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_the_compiled_steps_module_equals_the_eager_decode(quantize, tiny_model):
    """decode_step.DecodeStep (what compiled_decode exports), run eagerly, gives the eager decode's logits and K/V,
    with an attention scale unlike head_dim ** -0.5 (it runs the family's block, not a copy of it)."""
    from arbor_torch.decode_step import DecodeStep

    lm = tiny_model(hidden_size=64, intermediate_size=128, num_attention_heads=4, query_pre_attn_scalar=24,
                    attention_bias=True, vocab_size=128)
    if quantize:
        from arbor_torch.quantize import quantize_model

        quantize_model(lm.model, quantize)
    cache = lm.new_cache(32)
    lm.prefill([3, 9, 27, 81, 17], cache)
    with torch.no_grad():
        step = DecodeStep(lm.model)
        positions = torch.zeros(cache.length, dtype=torch.long)
        logits, k, v = step(torch.tensor([40]), cache.stacked_k, cache.stacked_v, lm.model.rope_cos,
                            lm.model.rope_sin, positions)
    want = lm.decode(40, cache)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, cache.stacked_k[:, :, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, cache.stacked_v[:, :, 5], rtol=1e-5, atol=1e-5)


def test_which_strategies_run_a_family():
    from arbor_core.config import ArborConfig
    from arbor_torch.arch import family
    from arbor_torch.decode_step import DecodeStep
    from arbor_torch.model import Transformer
    from test_gemma import TINY_GEMMA

    shape = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6)
    llama, windowed = ArborConfig(**shape), ArborConfig(**shape, model_type="mistral", sliding_window=8)
    gemma = ArborConfig(**TINY_GEMMA)
    assert "compiled_cpu" in family(llama).decode_strategies(llama)
    for cfg in (windowed, gemma):
        assert family(cfg).decode_strategies(cfg) == {"eager", "cuda_graph"}
        with pytest.raises(ValueError, match="does not run this model"):
            DecodeStep(Transformer(cfg))


def test_cuda_prefill_chunks_bound_the_mlp_transient():
    from arbor_torch.runner import CUDA_PREFILL_TRANSIENT_BYTES, cuda_prefill_chunk

    assert cuda_prefill_chunk(1536) == 32768  # SmolLM2-135M: 96 MiB at 32K tokens
    assert cuda_prefill_chunk(8192) == 8192   # SmolLM2-1.7B
    for width in (1536, 8192, 11008, 14336, 28672):
        chunk = cuda_prefill_chunk(width)
        assert chunk & (chunk - 1) == 0 and width * chunk * 2 <= CUDA_PREFILL_TRANSIENT_BYTES
