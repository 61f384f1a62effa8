"""arbor vs Hugging Face transformers (eager, SDPA) on one GPU, side by side in one run.

    python benchmarks/gpu_bench.py --model smollm2-135m-instruct --contexts 4k,32k,128k --vs-hf
    python benchmarks/gpu_bench.py --random-shape smollm2-1.7b --contexts 4k,128k --vs-hf
    python benchmarks/gpu_bench.py --kv-bits 8 --contexts 128k          # the int8 KV cache
    python benchmarks/gpu_bench.py --random-shape gemma3-270m --contexts 4k,32k --eager-too

For each context: prefill of a (context - 65)-token prompt, greedy decode of 64 tokens at that
depth, peak GPU memory. A shape name builds random weights of that model's shape (what the
issue's reference figures used). --eager-too adds rows with the captured-graph decode turned off
(ARBOR_CUDA_GRAPHS=0's path), engine "arbor-eager". Prints a table with arbor/transformers ratios;
--json writes rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPES = {  # config.json fields of the real models, random weights
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         rope_theta=130000.0, tie_word_embeddings=True),
    # Qwen2.5(-Coder)-1.5B-Instruct as arbor imports its Q4_K_M GGUF (the output head apart from the embedding)
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         attention_bias=True, tie_word_embeddings=False),
    # what arbor's GGUF import makes of Gemma 3 270M (weights/arbor_weights/gguf_import.py)
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=256, sliding_window=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]),
}


def random_checkpoint(shape: str, directory: Path):
    """A checkpoint of `shape` with small random weights, written as bf16 safetensors."""
    import torch
    from safetensors.torch import save_file

    from arbor_core.config import ArborConfig
    from arbor_torch.model import Transformer

    cfg = ArborConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    save_file(state, str(directory / "model.safetensors"))
    cfg.save(directory / "config.json")
    del model, state
    torch.cuda.empty_cache()


def load(model_name: str | None, shape: str | None, workdir: Path, kv_bits: int = 16):
    import arbor_torch
    import arbor_weights
    from arbor_cli.model import Model

    if shape:
        if not (workdir / "config.json").exists():
            random_checkpoint(shape, workdir)
        ckpt = arbor_weights.open_checkpoint(workdir)
        return Model(ckpt, arbor_torch.load(ckpt, "cuda", "bfloat16", kv_bits=kv_bits), tokenizer=None, backend="torch")
    import arbor_cli

    return arbor_cli.load(model_name, backend="torch", device="cuda", dtype="bfloat16", quiet=True, kv_bits=kv_bits)


def main() -> None:
    from arbor_cli.bench import bench_arbor, parse_contexts
    from arbor_torch.transformers_peer import bench as bench_transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-shape", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="4k,32k,128k")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vs-hf", action="store_true")
    ap.add_argument("--kv-bits", type=int, choices=(16, 8), default=16)
    ap.add_argument("--eager-too", action="store_true", help="also time decode without the captured graph")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.model, args.random_shape, Path(tmp), args.kv_bits)
        label = (args.random_shape or args.model) + (" kv8" if args.kv_bits == 8 else "")
        hf_state: dict = {}
        for context in parse_contexts(args.contexts):
            a = bench_arbor(model, context, args.tokens)
            rows.append({"model": label, **a.to_json()})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.eager_too:
                model.lm.use_cuda_graphs = False
                e = bench_arbor(model, context, args.tokens)
                model.lm.use_cuda_graphs = True
                rows.append({"model": label, **e.to_json(), "engine": "arbor-eager"})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.vs_hf:
                h = bench_transformers(model.checkpoint, "cuda", "bfloat16", context, args.tokens, hf_state)
                rows.append({"model": label, **h.to_json()})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        hf_state.clear()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    gib = 1 << 30
    print(f"{'model':<22}{'engine':<14}{'context':>8}{'prefill s':>11}{'decode tok/s':>14}{'peak GiB':>10}"
          f"{'decode x':>10}{'prefill x':>10}")
    by_key = {(r["model"], r["engine"], r["context"]): r for r in rows}
    for r in rows:
        if r["error"]:
            print(f"{r['model']:<22}{r['engine']:<14}{r['context']:>8}  failed: {r['error'][:60]}")
            continue
        peer = by_key.get((r["model"], "transformers", r["context"])) if r["engine"] == "arbor" else None
        ok = peer and not peer["error"]
        dx = f"{r['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.1f}" if ok else ""
        px = f"{peer['prefill_s'] / r['prefill_s']:.2f}" if ok else ""
        peak = f"{r['peak_memory_bytes'] / gib:.2f}" if r["peak_memory_bytes"] else "-"
        print(f"{r['model']:<22}{r['engine']:<14}{r['context']:>8}{r['prefill_s']:>11.3f}"
              f"{r['decode_tokens_per_s']:>14.1f}{peak:>10}{dx:>10}{px:>10}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
