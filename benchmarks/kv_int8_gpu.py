"""The int8 KV cache on a GPU: memory at a 128K-token context and its perplexity cost.

    python benchmarks/kv_int8_gpu.py                      # CUDA, default model, 131072 tokens, ppl at 8K/32K
    python benchmarks/kv_int8_gpu.py --json kv_int8.json  # also write the rows as JSON
    python benchmarks/kv_int8_gpu.py --device cpu --context 2048 --ppl-lengths 1k --decode 4   # a dry run

For kv-bits 16 and 8 in turn: load the model with that cache, prefill (context - 64) tokens of
the text (repeated if it is shorter), decode a few tokens, and report the KV cache's bytes
(cache.nbytes), the peak device memory (torch.cuda.max_memory_allocated; on CPU the process's
resident size) and the prefill/decode speed; then perplexity of the text's last 256 tokens at
each --ppl-lengths (arbor eval ppl's method, RoPE auto). On CUDA, int8 decodes on the eager path
(no CUDA graph / split-KV kernel: see docs/long-context.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "build" / "long-context" / "kjv_pentateuch.txt"
GIB = 1 << 30


def tokens_of(model, text: str, n: int) -> list[int]:
    """n token ids of `text`, cycling through it when it is shorter."""
    ids = model.tokenizer.encode(text)
    if not ids:
        raise SystemExit("the text has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_row(model, text: str, context: int, decode_tokens: int) -> dict:
    """Prefill context - 64 tokens into a fresh cache, decode a few; bytes and seconds."""
    lm = model.lm
    ids = tokens_of(model, text, context - 64)
    lm.reset_peak_memory()
    cache = model.new_cache(context)
    synchronize(lm.device)
    t0 = time.perf_counter()
    logits = lm.prefill(ids, cache, model.prefill_chunk)
    synchronize(lm.device)
    t1 = time.perf_counter()
    token = int(logits.argmax())
    for _ in range(decode_tokens):
        token = int(lm.decode(token, cache).argmax())
    synchronize(lm.device)
    t2 = time.perf_counter()
    return {"kv_bits": lm.kv_bits, "context": context, "prefill_tokens": len(ids), "cache_tokens": cache.length,
            "kv_cache_bytes": cache.nbytes, "peak_bytes": lm.peak_memory(), "weights_bytes": lm.weights_nbytes,
            "prefill_s": t1 - t0, "prefill_tokens_per_s": len(ids) / (t1 - t0),
            "decode_tokens_per_s": decode_tokens / (t2 - t1) if decode_tokens else None}


def perplexity_rows(model, text: str, lengths: list[int]) -> list[dict]:
    from arbor_cli.evals import run_perplexity

    ids = model.tokenizer.encode(text)
    rows = run_perplexity(model, ids, lengths, ["auto"])
    return [{"kv_bits": model.lm.kv_bits, "length": r.length, "rope": r.scaling, "perplexity": r.perplexity,
             "error": r.error, "seconds": r.seconds} for r in rows]


def run(model_name: str | None, device: str, context: int, lengths: list[int], text: str, decode_tokens: int,
        dtype: str | None) -> dict:
    import torch

    import arbor_cli

    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device, "memory": [], "ppl": []}
    for bits in (16, 8):
        model = arbor_cli.load(model_name, backend="torch", device=device, dtype=dtype, quiet=True, kv_bits=bits)
        out["model"], out["dtype"] = model.checkpoint.name, model.dtype
        try:
            out["memory"].append(memory_row(model, text, context, decode_tokens))
        except arbor_cli.ArborError as e:  # e.g. the 16-bit cache does not fit where int8 does
            out["memory"].append({"kv_bits": bits, "context": context, "error": str(e)})
        print_row(out["memory"][-1])
        out["ppl"] += perplexity_rows(model, text, lengths)
        for row in out["ppl"][-len(lengths):]:
            print(f"kv-bits {bits:2d}  ppl at {row['length']:>6,}: "
                  + (f"{row['perplexity']:.4f}" if row["perplexity"] else f"error: {row['error']}"), flush=True)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print_summary(out)
    return out


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"kv-bits {r['kv_bits']:2d}  context {r['context']:,}: error: {r['error']}", flush=True)
        return
    decode = f", decode {r['decode_tokens_per_s']:.1f} tok/s" if r["decode_tokens_per_s"] else ""
    print(f"kv-bits {r['kv_bits']:2d}  context {r['context']:,}: prefill {r['prefill_tokens']:,} tokens in "
          f"{r['prefill_s']:.1f} s{decode}; KV cache {r['kv_cache_bytes'] / GIB:.3f} GiB, "
          f"peak {r['peak_bytes'] / GIB:.3f} GiB (weights {r['weights_bytes'] / GIB:.3f} GiB)", flush=True)


def print_summary(out: dict) -> None:
    by_bits = {r["kv_bits"]: r for r in out["memory"] if "error" not in r}
    if 16 in by_bits and 8 in by_bits:
        print(f"KV cache int8 / 16-bit: {by_bits[8]['kv_cache_bytes'] / by_bits[16]['kv_cache_bytes']:.3f}; "
              f"peak int8 / 16-bit: {by_bits[8]['peak_bytes'] / by_bits[16]['peak_bytes']:.3f}")
    ppl = {(r["kv_bits"], r["length"]): r["perplexity"] for r in out["ppl"]}
    for (bits, length), value in sorted(ppl.items()):
        base = ppl.get((16, length))
        if bits == 8 and value and base:
            print(f"ppl at {length:,}: 16-bit {base:.4f}, int8 {value:.4f} ({100 * (value / base - 1):+.2f}%)")


def main(argv: list[str] | None = None) -> None:
    from arbor_cli.evals import parse_lengths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name or path (default: arbor's default model)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--ppl-lengths", default="8k,32k")
    p.add_argument("--decode", type=int, default=32, help="tokens decoded after the prefill (speed)")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="a long plain text (KJV Pentateuch by default)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not Path(args.text).is_file():
        sys.exit(f"kv_int8_gpu: {args.text}: no such file (benchmarks/passkey_run.sh fetches the KJV text)")
    text = Path(args.text).read_text(encoding="utf-8")
    out = run(args.model, args.device, args.context, parse_lengths(args.ppl_lengths), text, args.decode, args.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
