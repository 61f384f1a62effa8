"""A random-weights GGUF of the SmolLM2-1.7B shape: the CPU benchmarks at the size of a real laptop model.

    nice -n 10 python benchmarks/make_random_gguf.py [--out build/bench/smollm2-1.7b-random.Q4_1.gguf]
        [--sdist /tmp/lcp/llama_cpp_python-0.3.36.tar.gz] [--seed 0] [--keep]
    python benchmarks/cpu_bench.py --gguf build/bench/smollm2-1.7b-random.Q4_1.gguf --reps 3

Decode and prefill cost depends on the shapes and the weight format, not on the values, so random
weights time like the real model. No network: config.json is written here (HuggingFaceTB/
SmolLM2-1.7B-Instruct's shape), the tokenizer files are the default model's (the same 49,152-token
vocabulary and chat template). Matrices are N(0, 0.02), norms 1 (the HF initialisation), float16,
tied embeddings. llama.cpp's own converter (convert_hf_to_gguf.py, with its bundled gguf-py, from
the llama-cpp-python sdist, extracted under build/) writes an f16 GGUF; llama_cpp.llama_model_quantize
makes the layers Q4_1 and the token embedding Q8_0, the default model's layout. The intermediates
(safetensors, f16 GGUF) are deleted unless --keep. Needs ~7 GB RAM and ~7 GB of disk under build/.
Greedy text from it is noise: use it for speed and memory, not for parity.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
SDIST = Path("/tmp/lcp/llama_cpp_python-0.3.36.tar.gz")

# HuggingFaceTB/SmolLM2-1.7B-Instruct's config.json (bf16 there; float16 here, as llama.cpp's f16 outtype)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 64,
    "hidden_act": "silu",
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 130000,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "float16",
}


def tokenizer_dir() -> Path:
    import arbor_weights

    return Path(arbor_weights.resolve(arbor_weights.DEFAULT_MODEL, quiet=True).path)


def write_checkpoint(out: Path, seed: int) -> int:
    """config, tokenizer and random float16 weights in HF Llama names; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / name, out / name)
    c, g = CONFIG, torch.Generator().manual_seed(seed)
    h, ffn, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    tensors = {"model.embed_tokens.weight": normal(c["vocab_size"], h),
               "model.norm.weight": torch.ones(h, dtype=torch.float16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(ffn, h), p + "mlp.up_proj.weight": normal(ffn, h),
            p + "mlp.down_proj.weight": normal(h, ffn),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def converter(sdist: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, extracted once under build/."""
    top = sdist.name.removesuffix(".tar.gz")
    vendor = ROOT / "build" / "lcp-src" / top / "vendor" / "llama.cpp"
    script = vendor / "convert_hf_to_gguf.py"
    if script.is_file() and (vendor / "conversion").is_dir() and (vendor / "gguf-py").is_dir():
        return script
    if not sdist.is_file():
        sys.exit(f"make_random_gguf: {sdist} not found (the llama-cpp-python sdist; pass --sdist)")
    prefix = f"{top}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(ROOT / "build" / "lcp-src", members=members, filter="data")
    return script


def quantize(src: Path, dst: Path, threads: int) -> None:
    """Q4_1 layers, Q8_0 token embedding (and output head, were it untied): the default model's layout."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"make_random_gguf: llama_model_quantize returned {rc}")


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BUILD / "smollm2-1.7b-random.Q4_1.gguf")
    ap.add_argument("--sdist", type=Path, default=SDIST, help="llama-cpp-python sdist holding llama.cpp's converter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the quantizer")
    ap.add_argument("--keep", action="store_true", help="keep the safetensors checkpoint and the f16 GGUF")
    args = ap.parse_args()
    out = args.out.resolve()
    hf_dir, f16 = out.parent / (out.stem + "-hf"), out.with_name(out.stem + ".f16.gguf")
    script = converter(args.sdist)

    t0 = time.perf_counter()
    n = write_checkpoint(hf_dir, args.seed)
    print(f"checkpoint: {n:,} parameters in {hf_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t1 = time.perf_counter()
    # the converter puts its own gguf-py first on sys.path (unless NO_LOCAL_GGUF): the installed gguf is not used
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", "f16", "--outfile", str(f16)],
                   check=True, env=env)
    print(f"f16 GGUF: {f16.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t1:.0f} s)", flush=True)
    if not args.keep:
        shutil.rmtree(hf_dir)
    t2 = time.perf_counter()
    quantize(f16, out, args.threads)
    if not args.keep:
        f16.unlink()
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t2:.0f} s); tensor types "
          f"{tensor_types(out)}")


if __name__ == "__main__":
    main()
