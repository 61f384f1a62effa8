"""arbor's CPU integer kernels (backends/arbor_torch/integer_kernels.cpp) against PyTorch's int4 / int8 kernels
on the Qwen2.5-1.5B's projection shapes: random Q4_K blocks, the same numbers in each engine's layout (Q6_K: random
blocks of its own), engines alternated round by round, best of --reps; `uptime` printed before and after (the
machine may be shared). "aten int4" is Int4Linear as the model runs it: the int4 kernel below 64 rows, a bf16
dequantization + GEMM from 64 (prefill); "aten int8" the int8 kernel.

    python benchmarks/integer_kernels_bench.py [--rows 1] [--reps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from arbor_torch import integer_kernels as ik
from arbor_torch.quantize import Int4Linear, int4_linear_from_codes, int8_linear_from_codes, quantize_int8
from arbor_weights import quantized

# (name, N out, K in): one layer's products of Qwen2.5-1.5B (q/k/v fused 2048 rows, o, gate+up fused, down) + head
SHAPES = [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960),
          ("head", 151936, 1536),
          # the 0.5B's (896 wide, 4864 inner): most of its layers are Q5_0
          ("qkv05", 1152, 896), ("gate_up05", 9728, 896), ("down05", 896, 4864), ("head05", 151936, 896)]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def q4k_entries(n: int, k: int, rng) -> dict[str, np.ndarray]:
    return {"qweight": rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
            "super_scales": (rng.random((n, k // 256, 2)) * 0.01).astype(np.float16),
            "sub_scales": rng.integers(0, 64, (n, k // 32, 2), dtype=np.uint8)}


def q6k_entries(n: int, k: int, rng) -> dict[str, np.ndarray]:
    return {"qweight": rng.integers(-32, 32, (n, k), dtype=np.int8),
            "super_scales": (rng.random((n, k // 256, 1)) * 0.01).astype(np.float16),
            "sub_scales": rng.integers(-64, 64, (n, k // 16), dtype=np.int8)}


def engines(n: int, k: int, rng) -> dict:
    """name -> (callable on x, weight bytes read per call). Q4_K / Q6_K need K a multiple of 256 (the 0.5B's 896
    is not: its layers there are Q5_0 / Q8_0); the int8 rows are re-fitted from the Q5_0 weights or the Q4_K ones."""
    out = {}
    codes5 = rng.integers(-16, 16, (n, k), dtype=np.int8)
    scales5 = (rng.random((n, k // 32)) * 0.01).astype(np.float16)
    packed5 = ik.pack_q5(codes5, scales5)
    w = torch.from_numpy(codes5).float() * torch.from_numpy(scales5).float().repeat_interleave(32, dim=1)
    if k % 256 == 0:
        e = q4k_entries(n, k, rng)
        packed = ik.pack_q4k(e["qweight"], e["super_scales"], e["sub_scales"])
        out["arbor q4k"] = (lambda x: torch.ops.arbor.q4k_mm(x, packed, n), packed.numel())
        w = torch.from_numpy(quantized.dequantize(e))
        if Int4Linear.supports(w):
            codes = torch.stack([torch.from_numpy(e["qweight"]) & 15, torch.from_numpy(e["qweight"]) >> 4], -1)
            scale, low = (torch.from_numpy(a) for a in quantized.k_block_constants(e))
            lin = int4_linear_from_codes(codes.reshape(n, k), scale, 8 * scale - low)
            out["aten int4"] = (lambda x: lin(x), lin.qweight.numel() + lin.scale_zero.numel() * 2)  # as the model runs it
        e6 = q6k_entries(n, k, rng)
        packed6 = ik.pack_q6k(e6["qweight"], e6["super_scales"], e6["sub_scales"])
        out["arbor q6k"] = (lambda x: torch.ops.arbor.q6k_mm(x, packed6, n), packed6.numel())
    out["arbor q5"] = (lambda x: torch.ops.arbor.q5_mm(x, packed5, n), packed5.numel())
    q8, s8 = quantize_int8(w)
    rows8 = int8_linear_from_codes(q8, s8)
    out["aten int8"] = (lambda x: rows8(x), q8.numel() + 2 * n)  # as the model runs it (bf16 GEMM from 64 rows)
    out["arbor i8"] = (lambda x: torch.ops.arbor.i8_mm(x, q8, s8), q8.numel() + 2 * n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="activation rows (1: decode; 512: prefill)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES[:5]))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiles", default="", help="activation rows per tile to alternate, e.g. 4,8 (default: as built)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not ik.available():
        sys.exit("integer kernels unavailable")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = {"uptime_before": uptime(), "threads": torch.get_num_threads(), "rows": args.rows,
               "isa": ik.isa_in_use(), "shapes": {}}
    print(results["uptime_before"], file=sys.stderr)
    for name, n, k in SHAPES:
        if name not in args.shapes.split(","):
            continue
        found = engines(n, k, rng)
        for tile in filter(None, args.tiles.split(",")):  # the same kernels at another tile height
            for e in [e for e in list(found) if e.startswith("arbor q") and "@" not in e]:
                fn, size = found[e]
                found[f"{e}@{tile}"] = (lambda x, fn=fn, t=int(tile): (torch.ops.arbor.set_tile(t), fn(x),
                                                                       torch.ops.arbor.set_tile(8))[1], size)
        x = torch.randn(args.rows, k)
        best = {e: float("inf") for e in found}
        for _ in range(args.reps):
            for e, (fn, _) in found.items():
                start = time.perf_counter()
                fn(x)
                best[e] = min(best[e], time.perf_counter() - start)
        row = {e: {"ms": best[e] * 1e3, "GB/s": found[e][1] / best[e] / 1e9} for e in found}
        results["shapes"][f"{name} {n}x{k}"] = row
        print(f"{name:8s} {n}x{k}: " + "  ".join(f"{e} {v['ms']:.3f} ms ({v['GB/s']:.1f} GB/s)" for e, v in row.items()),
              file=sys.stderr)
        del found
    results["uptime_after"] = uptime()
    print(results["uptime_after"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
