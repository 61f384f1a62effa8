"""The AOT-compiled CPU decode step (backends/arbor_torch/compiled_decode.py): same tokens as the eager
path; a stale artifact is never loaded, a damaged one is rebuilt with one notice, a failing compiler
or a wrong library falls back to eager. Each compile of the tiny model takes ~10-30 s on 2 cores."""

import shutil
import zipfile

import pytest
import torch

# compiles C++ (AOTInductor): a machine without a compiler falls back to eager (test_a_failing_compiler_...
# simulates that), and cannot run the rest
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
pytestmark = pytest.mark.slow
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="needs a C++ compiler")

# int4-tileable shapes (rows a multiple of 64, inputs of 32), so the tiny model runs the int4 kernels
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000.0)


def quantized_tiny(seed: int = 0):
    from arbor_core.config import ArborConfig
    from arbor_core.rope import rope_frequencies
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    cfg = ArborConfig(**TINY)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    lm = TorchModel(model, "cpu", "float32", quantize="int4")
    lm.set_rope(rope_frequencies(cfg), 256)
    return lm


def greedy(lm, prompt=(3, 17, 42, 5, 99), n=24):
    from arbor_core.backend import SamplingParams

    cache = lm.new_cache(128)
    token = lm.sample(lm.prefill(list(prompt), cache, 512), SamplingParams(), None)
    tokens, logits = [token], []
    for _ in range(n):
        step = lm.decode(token, cache)
        logits.append(step.clone())
        token = lm.sample(step, SamplingParams(), None)
        tokens.append(token)
    return tokens, torch.stack(logits)


@pytest.fixture
def compile_dir(tmp_path, monkeypatch):
    path = tmp_path / "compiled"
    monkeypatch.setenv("ARBOR_COMPILE", "sync")
    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(path))
    return path


def artifacts(path):
    return sorted(p.name for p in path.glob("*.pt2"))


@needs_cxx
def test_compiled_step_gives_the_eager_tokens_and_is_reused(compile_dir, capfd, monkeypatch):
    lm = quantized_tiny()
    assert lm.compiled is not None
    tokens, logits = greedy(lm)
    assert lm.compiled.run is not None, capfd.readouterr().err  # it really ran compiled
    err = capfd.readouterr().err
    assert "compiling the decode step" in err and "compiled in" in err
    assert len(artifacts(compile_dir)) == 1

    monkeypatch.setenv("ARBOR_COMPILE", "0")
    eager = quantized_tiny()
    assert eager.compiled is None
    eager_tokens, eager_logits = greedy(eager)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)

    monkeypatch.setenv("ARBOR_COMPILE", "sync")
    again = quantized_tiny()
    assert greedy(again)[0] == tokens
    assert again.compiled.run is not None
    assert "compiling" not in capfd.readouterr().err  # loaded, not rebuilt
    assert len(artifacts(compile_dir)) == 1


@needs_cxx
def test_stale_artifact_is_not_loaded_but_rebuilt(compile_dir, capfd, monkeypatch):
    from arbor_torch import compiled_decode

    tokens = greedy(quantized_tiny())[0]
    [first] = artifacts(compile_dir)
    capfd.readouterr()
    # another torch version (or other generated-from sources, another model format): another file
    real_key = compiled_decode.artifact_key
    monkeypatch.setattr(compiled_decode, "artifact_key",
                        lambda step, weights: {**real_key(step, weights), "torch": "9.9.9"})
    lm = quantized_tiny()
    assert greedy(lm)[0] == tokens
    assert lm.compiled.run is not None
    assert "compiling the decode step" in capfd.readouterr().err
    names = artifacts(compile_dir)
    assert len(names) == 2 and first in names
    # another model (other shapes): its own artifact too
    monkeypatch.setattr(compiled_decode, "artifact_key", real_key)
    TINY["intermediate_size"], saved = 192, TINY["intermediate_size"]
    try:
        other = quantized_tiny()
        greedy(other)
    finally:
        TINY["intermediate_size"] = saved
    assert other.compiled.run is not None
    assert len(artifacts(compile_dir)) == 3


@needs_cxx
def test_damaged_artifact_is_replaced_with_one_notice(compile_dir, capfd):
    tokens = greedy(quantized_tiny())[0]
    [name] = artifacts(compile_dir)
    path = compile_dir / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated, as by a full disk or a killed copy
    capfd.readouterr()
    lm = quantized_tiny()
    assert greedy(lm)[0] == tokens
    err = capfd.readouterr().err
    assert "is damaged" in err and "rebuilding" in err and "Traceback" not in err
    assert lm.compiled.run is not None
    assert zipfile.is_zipfile(path) and path.stat().st_size > len(data) // 2  # whole again

    path.write_bytes(b"not a zip file at all")
    lm = quantized_tiny()
    assert greedy(lm)[0] == tokens
    assert "is damaged" in capfd.readouterr().err


def test_a_failing_compiler_falls_back_once_and_is_remembered(compile_dir, capfd, monkeypatch):
    from arbor_torch import compiled_decode

    def no_compiler(*_args, **_kw):
        raise RuntimeError("Compiler not found: g++\nmore detail")

    monkeypatch.setattr(compiled_decode, "compile_step", no_compiler)
    monkeypatch.setenv("ARBOR_COMPILE", "0")
    eager_tokens = greedy(quantized_tiny())[0]
    monkeypatch.setenv("ARBOR_COMPILE", "sync")
    lm = quantized_tiny()
    assert greedy(lm)[0] == eager_tokens
    err = capfd.readouterr().err
    assert err.count("could not compile the decode step (RuntimeError: Compiler not found: g++)") == 1
    assert "Traceback" not in err and "more detail" not in err
    assert lm.compiled.off and lm.compiled.run is None
    assert list(compile_dir.glob("*.failed"))

    calls = []
    monkeypatch.setattr(compiled_decode, "compile_step", lambda *a, **k: calls.append(a))
    lm = quantized_tiny()
    assert greedy(lm)[0] == eager_tokens
    assert not calls  # not retried: the failure is remembered
    assert "compiling failed before" in capfd.readouterr().err


@needs_cxx
def test_a_library_that_disagrees_with_eager_is_never_used(compile_dir, capfd, monkeypatch):
    from arbor_torch import compiled_decode

    tokens = greedy(quantized_tiny())[0]
    [name] = artifacts(compile_dir)
    real_load = compiled_decode.CompiledDecode._load

    def wrong(self, path):
        run = real_load(self, path)
        return None if run is None else (lambda inputs: [-t for t in run(inputs)])

    monkeypatch.setattr(compiled_decode.CompiledDecode, "_load", wrong)
    capfd.readouterr()
    lm = quantized_tiny()
    assert greedy(lm)[0] == tokens
    assert "failed its check" in capfd.readouterr().err
    assert lm.compiled.off
    assert not (compile_dir / name).exists()


def test_int8_kv_and_float_weights_stay_eager(compile_dir):
    from arbor_core.config import ArborConfig
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    cfg = ArborConfig(**TINY)
    assert TorchModel(Transformer(cfg), "cpu", "float32").compiled is None  # the exact float path
    assert TorchModel(Transformer(cfg), "cpu", "float32", kv_bits=8, quantize="int4").compiled is None
    windowed = ArborConfig(**{**TINY, "sliding_window": 16})
    assert TorchModel(Transformer(windowed), "cpu", "float32", quantize="int4").compiled is None
