"""llama.cpp's own converter (convert_hf_to_gguf.py) run on tiny Hugging Face models, for the GGUF import tests.

A GGUF written by llama.cpp's converter is the reference no one here wrote: an architecture is proved
by converting a tiny random model of it with that script and checking that arbor's import runs it to
the logits transformers gives the original. The converter is not on PyPI as a package; it ships in
llama-cpp-python's source distribution (vendor/llama.cpp), with the gguf-py it was written against.
It is fetched once per machine (`pip download`, the registry CI reaches anyway) into arbor's test cache,
or taken from $ARBOR_LLAMA_CPP_DIR (a llama.cpp checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is the reference
DIR_ENV = "ARBOR_LLAMA_CPP_DIR"
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arbor-tests"


def _fetch(dest: Path) -> None:
    """Download the sdist and extract the converter, its conversion package and gguf-py into dest."""
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "convert_hf_to_gguf.py").is_file():
            return
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp, "-q"],
                                 capture_output=True, text=True)
            if got.returncode != 0:
                pytest.skip(f"llama.cpp's converter could not be fetched (pip download llama-cpp-python=="
                            f"{LLAMA_CPP_PYTHON} failed: {got.stderr.strip().splitlines()[-1:]})")
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            staging = Path(tmp) / "llama.cpp"
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
                for member in sdist.getmembers():
                    inner = member.name.removeprefix(prefix)
                    if member.name.startswith(prefix) and inner.startswith(NEEDED) and member.isfile():
                        member.name = inner
                        sdist.extract(member, staging, filter="data")
            staging.rename(dest)


def llama_cpp_dir() -> Path:
    """A directory holding llama.cpp's convert_hf_to_gguf.py (fetched on first use)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    dest = _cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not (dest / "convert_hf_to_gguf.py").is_file():
        _fetch(dest)
    return dest


def convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on a Hugging Face model directory; the GGUF it wrote."""
    root = llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)]), "NO_LOCAL_GGUF": ""}
    got = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
                          "--outtype", outtype], capture_output=True, text=True, env=env, cwd=root)
    assert got.returncode == 0, f"convert_hf_to_gguf.py failed:\n{got.stderr[-3000:]}"
    return out


def write_sentencepiece_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    """A tiny trained SentencePiece model (tokenizer.model) of exactly `vocab_size` pieces in hf_dir: the
    converter reads a Llama-style vocabulary from it without needing a known pre-tokenizer hash."""
    import sentencepiece as spm

    text = hf_dir / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings".split()
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 4, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(hf_dir / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", hard_vocab_limit=True, minloglevel=2, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, byte_fallback=False)
    (hf_dir / "tokenizer.vocab").unlink()
    text.unlink()
