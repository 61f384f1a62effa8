"""The compiled decode step built for next time in a detached process (backends/arbor_torch/background_compile.py),
never in the foreground by default: the command decodes eager, one build at a time, a decoding process switches to
the library once it is there, a failure leaves its .failed mark. The fast tests fake the compiler and the launch;
the slow one runs the real detached build of a tiny model and a fresh process that loads it."""

import os
import shutil
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

# int4-tileable shapes (rows a multiple of 64, inputs of 32), so the tiny model runs the int4 kernels
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


@pytest.fixture
def background(tmp_path, monkeypatch):
    """The default mode (background builds), an empty compile directory, and launches recorded, not run."""
    from arbor_torch import background_compile, compiled_decode

    monkeypatch.delenv("ARBOR_COMPILE", raising=False)
    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(tmp_path / "compiled"))
    launched, compiled_here = [], []
    monkeypatch.setattr(background_compile, "launch", lambda command, log: launched.append(command))
    monkeypatch.setattr(compiled_decode, "compile_step", lambda *a, **k: compiled_here.append(a))
    return launched, compiled_here


def load(checkpoint):
    import arbor_torch

    return arbor_torch.load(checkpoint, "cpu", "float32", quantize="int4")


def greedy(lm, n=20):  # past EAGER_FIRST (16): the steps where the library, if any, is used
    from arbor_core.backend import SamplingParams
    from arbor_core.rope import rope_frequencies

    cache = lm.new_cache(64, rope_frequencies(lm.config))
    token = lm.sample(lm.prefill([3, 17, 42, 5, 99], cache, 512), SamplingParams(), None)
    tokens = [token]
    for _ in range(n):
        tokens.append(token := lm.sample(lm.decode(token, cache), SamplingParams(), None))
    return tokens


def eager_tokens(checkpoint, monkeypatch):
    monkeypatch.setenv("ARBOR_COMPILE", "0")
    lm = load(checkpoint)
    assert lm.compiled is None
    tokens = greedy(lm)
    monkeypatch.delenv("ARBOR_COMPILE")
    return tokens


def test_a_missing_step_is_built_in_the_background_never_in_the_foreground(background, tiny_checkpoint, capfd,
                                                                           monkeypatch, tmp_path):
    from arbor_torch import background_compile

    launched, compiled_here = background
    checkpoint = tiny_checkpoint(**TINY)
    want = eager_tokens(checkpoint, monkeypatch)
    lm = load(checkpoint)
    assert greedy(lm) == want  # eager now
    assert not compiled_here and lm.compiled.run is None
    [command] = launched
    assert command[:3] == [sys.executable, "-m", background_compile.MODULE]
    assert command[3:6] == [str(checkpoint.path), "float32", "int4"]
    assert command[6] == str(lm.compiled.path) and lm.compiled.path.parent == tmp_path / "compiled"
    err = capfd.readouterr().err
    assert err.count("compiling the decode step in the background for next time") == 1
    assert len(err.strip().splitlines()) == 1

    greedy(lm)  # the same model does not launch again while its build runs
    assert len(launched) == 1 and not capfd.readouterr().err


def test_a_second_command_decodes_eagerly_while_another_builds(background, tiny_checkpoint, capfd, monkeypatch):
    from arbor_torch import background_compile, compiled_decode
    from arbor_weights import store
    from arbor_weights.store import held_lock

    launched, compiled_here = background
    monkeypatch.setattr(store, "held_lock", lambda *a, **k: pytest.fail("waited for the lock"))  # never waits on it
    checkpoint = tiny_checkpoint(**TINY)
    want = eager_tokens(checkpoint, monkeypatch)
    lm = load(checkpoint)
    path = compiled_decode.cache_directory() / "decode-x.pt2"
    lm.compiled.path, lm.compiled.key = path, {}  # its name known, so the lock held here is its lock
    with held_lock(background_compile.lock_name(path)):  # as a build in another process holds it
        assert greedy(lm) == want
    assert not launched and not compiled_here
    err = capfd.readouterr().err
    assert "another arbor process is compiling the decode step" in err and len(err.strip().splitlines()) == 1


def test_a_decoding_process_switches_to_the_library_once_it_is_built(background, tiny_checkpoint, monkeypatch):
    from arbor_core.backend import SamplingParams
    from arbor_core.rope import rope_frequencies
    from arbor_torch import compiled_decode

    launched, _ = background
    monkeypatch.setattr(compiled_decode, "LOOK_AGAIN_S", 0.0)
    checkpoint = tiny_checkpoint(**TINY)
    want = eager_tokens(checkpoint, monkeypatch)
    lm = load(checkpoint)
    compiled, calls = lm.compiled, []

    def library(inputs):  # the eager step itself, standing in for the compiled library
        calls.append(1)
        return compiled.step_module(*inputs[len(compiled.weight_list):])

    monkeypatch.setattr(compiled_decode, "load_library", lambda path: type("Loader", (), {"boxed_run": library}))
    cache = lm.new_cache(64, rope_frequencies(lm.config))
    tokens = [lm.sample(lm.prefill([3, 17, 42, 5, 99], cache, 512), SamplingParams(), None)]
    for i in range(20):
        if i == 5:  # the background build finishes
            assert launched and compiled.run is None and not calls
            compiled.path.write_bytes(b"the library")
        tokens.append(lm.sample(lm.decode(tokens[-1], cache), SamplingParams(), None))
    assert tokens == want
    assert compiled.run is library and len(calls) == 20 - compiled_decode.EAGER_FIRST  # its check, then each step


@pytest.mark.parametrize("compile_mode", ["1", "sync"])
def test_a_short_reply_never_loads_the_library_a_long_one_uses_it(tmp_path, tiny_checkpoint, monkeypatch,
                                                                  compile_mode):
    """The first EAGER_FIRST steps of a process run eager (ARBOR_COMPILE=sync: none): a reply that ends within them
    neither loads nor checks the library; the next step loads, checks and uses it."""
    from arbor_core.backend import SamplingParams
    from arbor_core.rope import rope_frequencies
    from arbor_torch import compiled_decode

    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(tmp_path / "compiled"))
    checkpoint = tiny_checkpoint(**TINY)
    want = eager_tokens(checkpoint, monkeypatch)
    monkeypatch.setenv("ARBOR_COMPILE", compile_mode)
    lm = load(checkpoint)
    compiled, loads, calls = lm.compiled, [], []

    def library(inputs):
        calls.append(1)
        return compiled.step_module(*inputs[len(compiled.weight_list):])

    def load_library(path):
        loads.append(path)
        return type("Loader", (), {"boxed_run": library})

    monkeypatch.setattr(compiled_decode, "load_library", load_library)
    key = compiled_decode.artifact_key(compiled.step_module, compiled.weights)
    (compiled_decode.cache_directory() / f"decode-{compiled_decode.key_digest(key)}.pt2").write_bytes(b"a library")
    cache = lm.new_cache(64, rope_frequencies(lm.config))
    tokens = [lm.sample(lm.prefill([3, 17, 42, 5, 99], cache, 512), SamplingParams(), None)]
    assert compiled_decode.EAGER_FIRST >= 8  # the README's chat reply, one sentence, is 8 tokens
    first = 0 if compile_mode == "sync" else compiled_decode.EAGER_FIRST
    for step in range(1, 21):
        tokens.append(lm.sample(lm.decode(tokens[-1], cache), SamplingParams(), None))
        assert (len(loads), len(calls)) == ((0, 0) if step <= first else (1, step - first)), step  # one call a step
    assert tokens == want and compiled.run is library


def test_a_model_made_in_memory_is_compiled_only_when_asked(background, monkeypatch):
    from arbor_core.config import ArborConfig
    from arbor_core.rope import rope_frequencies
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    launched, compiled_here = background
    lm = TorchModel(Transformer(ArborConfig(**TINY, num_hidden_layers=2)), "cpu", "float32", quantize="int4")
    lm.set_rope(rope_frequencies(lm.config), 256)
    assert lm.compiled.source is None  # no checkpoint to rebuild it from
    greedy(lm)
    assert lm.compiled.off and not launched and not compiled_here


def test_the_build_job_writes_under_the_lock_once_and_a_failure_leaves_its_mark(background, tiny_checkpoint,
                                                                              monkeypatch, capfd):
    from arbor_torch import background_compile, compiled_decode

    monkeypatch.setattr(background_compile, "lower_priority", lambda: None)  # not this test process
    checkpoint = tiny_checkpoint(**TINY)
    lm = load(checkpoint)
    greedy(lm)  # names the artifact (and launches a recorded, unrun build)
    path, source = lm.compiled.path, lm.compiled.source
    argv = [source.checkpoint, source.dtype, source.quantize, str(path)]
    built = []

    def fake_compile(step, weights, example, out):
        built.append(out)
        out.write_bytes(b"a library")

    monkeypatch.setattr(compiled_decode, "compile_step", fake_compile)
    assert background_compile.main(argv) == 0
    assert built == [path] and path.read_bytes() == b"a library" and path.with_suffix(".json").exists()
    assert background_compile.main(argv) == 0 and len(built) == 1  # found built: nothing to do
    assert "nothing to do" in capfd.readouterr().out

    path.unlink()

    def no_compiler(*_a, **_k):
        raise RuntimeError("Compiler not found: g++")

    monkeypatch.setattr(compiled_decode, "compile_step", no_compiler)
    assert background_compile.main(argv) == 1
    assert "Compiler not found" in path.with_suffix(".failed").read_text() and not path.exists()
    capfd.readouterr()
    other = load(checkpoint)
    other.compiled.building = True  # the process that launched it sees the failure and stays eager
    greedy(other)
    assert other.compiled.off
    assert "compiling the decode step in the background failed (RuntimeError: Compiler not found" in capfd.readouterr().err

    # a checkpoint changed since the command: not this artifact, so no mark either
    path.with_suffix(".failed").unlink()
    assert background_compile.main([*argv[:3], str(path.with_name("decode-other.pt2"))]) == 1
    assert not path.with_name("decode-other.failed").exists()


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="needs a C++ compiler")
def test_the_detached_build_writes_a_library_a_new_process_loads_without_the_inductor_toll(tiny_checkpoint, tmp_path,
                                                                                           monkeypatch, capfd):
    from arbor_torch import background_compile

    monkeypatch.delenv("ARBOR_COMPILE", raising=False)
    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(tmp_path / "compiled"))
    checkpoint = tiny_checkpoint(**TINY)
    lm = load(checkpoint)
    greedy(lm)
    job = background_compile._launched[-1]
    try:
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    path = lm.compiled.path
    log = path.with_suffix(".log").read_text()
    assert job.returncode == 0, log
    assert "compiled in" in log and "done" in log and "Warning" not in log  # said in its log, not on the terminal
    assert path.exists() and capfd.readouterr().err.count("arbor:") == 1

    script = f"""
import sys, arbor_torch
from arbor_core.backend import SamplingParams
from arbor_core.rope import rope_frequencies
from arbor_weights.checkpoint import open_checkpoint
lm = arbor_torch.load(open_checkpoint({str(checkpoint.path)!r}), "cpu", "float32", quantize="int4")
cache = lm.new_cache(64, rope_frequencies(lm.config))
token = lm.sample(lm.prefill([3, 17, 42, 5, 99], cache, 512), SamplingParams(), None)
tokens = [token]
for _ in range(20):
    tokens.append(token := lm.sample(lm.decode(token, cache), SamplingParams(), None))
print(lm.compiled.run is not None, "torch._inductor" in sys.modules, tokens)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ran_compiled, inductor_imported, tokens = out.stdout.strip().split(" ", 2)
    assert (ran_compiled, inductor_imported) == ("True", "False"), (out.stdout, out.stderr, time.perf_counter() - start)
    assert tokens == str(greedy(lm)) and not out.stderr.strip()
