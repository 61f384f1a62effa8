"""Fixtures shared across test modules."""

import os

import pytest


def _compiled_steps_once_per_session():
    """Every test, and every `arbor` it runs, shares one directory of compiled decode steps (the real
    cache's, or $ARBOR_HOME's as the session starts): tests with a fresh ARBOR_HOME of their own would
    otherwise each compile the default model's step again (~1 minute on 2 cores)."""
    if "ARBOR_COMPILE_DIR" not in os.environ:
        import platformdirs

        home = os.environ.get("ARBOR_HOME") or platformdirs.user_cache_dir("arbor")
        os.environ["ARBOR_COMPILE_DIR"] = os.path.join(os.path.expanduser(home), "compiled")
    if "ARBOR_KERNEL_DIR" not in os.environ:  # arbor's CPU integer kernels (integer_kernels.py): built once too
        import platformdirs

        home = os.environ.get("ARBOR_HOME") or platformdirs.user_cache_dir("arbor")
        os.environ["ARBOR_KERNEL_DIR"] = os.path.join(os.path.expanduser(home), "kernels")


_compiled_steps_once_per_session()


def _compile_in_the_foreground():
    """A missing compiled decode step is built in the process that needs it (ARBOR_COMPILE=sync), as before
    background builds: the suite starts no detached compile that would outlive it or race its timings (the
    tests of background builds ask for them). ARBOR_COMPILE=0 set for the run is kept."""
    if os.environ.get("ARBOR_COMPILE", "1") != "0":
        os.environ["ARBOR_COMPILE"] = "sync"


_compile_in_the_foreground()


def _the_suite_runs_the_smallest_model():
    """A command, or arbor_cli.load(), that names no model runs $ARBOR_MODEL: the suite sets it to the 98 MB
    SmolLM2-135M (arbor_weights.SMALLEST_MODEL), not the default Qwen2.5-Coder-0.5B, so the tests of behaviour
    stay within CI's time (the default's own first command: tests/test_first_command.py). A run may set it."""
    import arbor_weights

    os.environ.setdefault("ARBOR_MODEL", arbor_weights.SMALLEST_MODEL)


_the_suite_runs_the_smallest_model()


@pytest.fixture(scope="session")
def default_gguf(default_checkpoint):
    """The suite's model's GGUF file ($ARBOR_MODEL, a registry name), downloaded once into the real user cache
    (or $ARBOR_HOME).

    After the checkpoint: importing the default model deletes its download, so it must not happen later."""
    import arbor_weights

    return arbor_weights.default_gguf_path(default_checkpoint.name, quiet=True)


@pytest.fixture(scope="session")
def default_checkpoint():
    """The suite's model ($ARBOR_MODEL: the 135M unless a run sets it) pulled and converted once, in the real
    user cache, so CI downloads it once."""
    import arbor_weights

    checkpoint = arbor_weights.resolve(arbor_weights.default_model(), quiet=True)
    _warm_compiled_step(checkpoint)
    return checkpoint


def _warm_compiled_step(checkpoint):
    """Build the default configuration's compiled decode step here, once, if it is not cached yet, so no
    test with a subprocess timeout is the one that pays for the compile."""
    import arbor_cli

    model = arbor_cli.load(str(checkpoint.path), backend="torch", device="cpu", quiet=True)
    model.generate("Hi", max_new_tokens=2, ignore_eos=True)


@pytest.fixture(scope="session")
def default_model(default_checkpoint):
    """The default model loaded once on CPU in float32 through the public API."""
    import arbor_cli

    return arbor_cli.load(str(default_checkpoint.path), backend="torch", device="cpu", dtype="float32", quiet=True)


# ---- tiny random models for the backend tests (test_backend_contract, test_torch_backend, test_mlx_backend,
# ---- test_kv_cache): fixtures, so no test module imports another ------------------------------------------
TINY_CONFIG = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64,
               "rope_theta": 1000.0}


def write_tiny_checkpoint(path, seed: int = 0, norms: float = 1.0, **over):
    """config.json + model.safetensors with random weights under HF names, as an Arbor checkpoint.

    Weights are N(0, 0.2); RMSNorm weights `norms` + N(0, 0.2) (0: the tiny torch model's style)."""
    import numpy as np
    from safetensors.numpy import save_file

    from arbor_core.config import ArborConfig
    from arbor_weights.checkpoint import open_checkpoint

    cfg = ArborConfig(**{**TINY_CONFIG, **over})
    rng = np.random.default_rng(seed)
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, cfg.intermediate_size)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.gemma:  # the norms around its MLP, and Gemma 3's q/k norms
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        if cfg.model_type == "gemma3_text":
            shapes.update({p + "self_attn.q_norm.weight": (cfg.head_dim,), p + "self_attn.k_norm.weight": (cfg.head_dim,)})
    tensors = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = (norms + t).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    cfg.save(path / "config.json")
    return open_checkpoint(path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """make(**config_overrides) -> a fresh tiny random checkpoint (write_tiny_checkpoint) under tmp_path."""
    def make(seed: int = 0, norms: float = 1.0, **over):
        return write_tiny_checkpoint(tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}", seed, norms, **over)
    return make


def build_tiny_torch_model(**over):
    """A TorchModel on CPU, float32, random weights N(0, 0.2) from torch's seed 0, RoPE set for 256 positions."""
    import torch

    from arbor_core.config import ArborConfig
    from arbor_core.rope import rope_frequencies
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000.0)
    kw.update(over)
    cfg = ArborConfig(**kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    lm = TorchModel(model, "cpu", "float32")
    lm.set_rope(rope_frequencies(cfg), 256)
    return lm


@pytest.fixture
def tiny_model():
    """make(**config_overrides) -> a tiny torch model (build_tiny_torch_model)."""
    return build_tiny_torch_model
# ---- end of the tiny-model section ---------------------------------------------------------------------------


# ==== arbor_weights and tokenizer tests (test_gguf_import, test_checkpoint, test_resolve, test_store, ====
# ==== test_pypi_wheel, test_hub, test_tokenizer, test_chat_template, test_gguf_vocab) =====================

@pytest.fixture
def arbor_home(tmp_path, monkeypatch):
    """An empty cache of the test's own (session fixtures, set up first, use the real one).

    Not autouse: the arbor_weights test modules ask for it with `pytestmark`."""
    home = tmp_path / "arbor-home"
    monkeypatch.setenv("ARBOR_HOME", str(home))
    return home


@pytest.fixture
def default_model_here(default_checkpoint, arbor_home):
    """The default model, with a document cache of the test's own (ARBOR_HOME): the ask tests'."""
    import arbor_cli

    return arbor_cli.load(str(default_checkpoint.path), quiet=True)


@pytest.fixture
def tiny_gguf(tmp_path):
    from gguf_files import Q, write_tiny_gguf

    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, qtype=Q.Q8_0)
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="session")
def smol_meta(default_gguf):
    from tokenizer_samples import gguf_metadata

    return gguf_metadata(default_gguf)


@pytest.fixture(scope="session")
def smol(smol_meta):
    from arbor_weights.gguf_vocab import tokenizer_from_gguf

    return tokenizer_from_gguf(smol_meta)


# a tiny sentencepiece model, trained here, stands in for Llama-2-style vocabularies
@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory):
    import sentencepiece
    from tokenizer_samples import english_sentences

    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(english_sentences()), model_prefix=str(prefix), vocab_size=360,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, control_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")


@pytest.fixture(scope="session")
def tiny_spm_meta(tiny_spm):
    from tokenizer_samples import CHATML, llama_cpp_token_type

    sp, n = tiny_spm, tiny_spm.GetPieceSize()
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(n)],
            "tokenizer.ggml.token_type": [llama_cpp_token_type(sp, i) for i in range(n)],
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True, "tokenizer.chat_template": CHATML}


@pytest.fixture(scope="session")
def tiny(tiny_spm_meta):
    from arbor_weights.gguf_vocab import tokenizer_from_gguf

    return tokenizer_from_gguf(tiny_spm_meta)

# ==== end of the arbor_weights and tokenizer section ====================================================


# ==== the fakes: a tokenizer of one token per word or punctuation mark and the one fake Model (fake_door.py: ====
# ==== summarize, evals, chat), the one fake backend runtime (generate, evals), and documents that say where each
# ==== piece came from ===========================================================================================
from fake_door import WORD, FakeModel, FakeTokenizer, count_words, word_offsets  # noqa: E402, F401


class FakeCache:
    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0


class FakeRuntime:
    """A backend's loaded model (arbor_core.backend.LoadedModel) reduced to the loop's needs: each prefill or
    decode step returns the next item of `script` as its logits, or `logits` once the script is used up;
    sample() takes a step's "logits" to be the token itself when it is an int. Records what it was fed."""

    prefill_chunk = 64
    exact_across_row_counts = False

    def __init__(self, script=(), logits=None):
        self.script, self.logits = list(script), logits
        self.fed: list[int] = []
        self.prefilled: list[int] = []  # the length of each prefill
        self.decoded = 0

    def _step(self):
        return self.script.pop(0) if self.script else self.logits

    def prefill(self, ids, cache, chunk_size):
        cache.length += len(ids)
        self.fed += ids
        self.prefilled.append(len(ids))
        return self._step()

    def decode(self, token, cache):
        cache.length += 1
        self.fed.append(token)
        self.decoded += 1
        return self._step()

    def sample(self, logits, params, rng, recent=()):
        return logits

    def new_rng(self, seed):
        return None


def document(paragraphs: int, sentences: int = 5, words: int = 12) -> str:
    """Paragraphs of numbered sentences, so any piece of text says where it came from."""
    out = []
    for p in range(paragraphs):
        out.append(" ".join(" ".join(f"p{p}s{s}w{w}" for w in range(words)) + "." for s in range(sentences)))
    return "\n\n".join(out)

# ==== end of the summarize section ===========================================================================
