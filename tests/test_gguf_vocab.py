"""A GGUF file's vocabulary rebuilt as a tokenizer: sentencepiece ('llama') and byte-level BPE ('gpt2')."""

import pytest
from tokenizer_samples import MULTIBYTE

import arbor_weights
from arbor_core.errors import ConfigError
from arbor_weights.gguf_vocab import tokenizer_from_gguf

pytestmark = pytest.mark.usefixtures("arbor_home")


# ---- sentencepiece vocabulary from GGUF metadata ----

SPM_SAMPLES = ["The quick brown fox.", "  leading spaces and  double  spaces", "tabs\tand\nnewlines\n",
               "unseen: Zebra 42 %$#@", MULTIBYTE, "Ünïcödé ∑ 日本語", ""]


@pytest.mark.parametrize("text", SPM_SAMPLES)
def test_gguf_sentencepiece_matches_the_original_model(tiny, tiny_spm, text):
    assert tiny.encode(text) == tiny_spm.encode(text)
    assert tiny.decode(tiny.encode(text)) == text


def test_gguf_sentencepiece_uses_byte_fallback_for_unseen_characters(tiny, tiny_spm):
    ids = tiny.encode("🙂")
    assert ids and all(tiny_spm.IsByte(i) or tiny_spm.IdToPiece(i) == "\u2581" for i in ids)


def test_unsupported_gguf_tokenizer_model_is_named(tiny_spm_meta):
    with pytest.raises(ConfigError, match="'bert'"):
        tokenizer_from_gguf({**tiny_spm_meta, "tokenizer.ggml.model": "bert"})


# ---- the vocabulary an import saves beside the weights ----

def test_imported_tokenizer_loads(tmp_path, tiny_gguf):
    tokenizer = pytest.importorskip("arbor_core.tokenizer")
    arbor_weights.import_gguf(tiny_gguf, tmp_path / "out", quiet=True)
    tok = tokenizer.load_tokenizer(tmp_path / "out")
    assert tok.decode(tok.encode("hello")).endswith("hello")


def test_default_checkpoint_tokenizer_loads(default_checkpoint):
    tokenizer = pytest.importorskip("arbor_core.tokenizer")
    assert (default_checkpoint.path / "tokenizer_config.json").is_file()
    tok = tokenizer.load_tokenizer(default_checkpoint.path)
    assert tok.decode(tok.encode("Hello, world!")).endswith("Hello, world!")
