"""One layer's prefill GEMMs (512 rows) of Qwen2.5-Coder-1.5B in each weight form, alternated, best of N.

    python benchmarks/prefill_kernels.py [--rows 512] [--reps 6]

Why: a 512-token prefill on the CPU spends its time in these four products a layer (q/k/v, o, gate/up,
down); this says how much of it is the per-call int4 -> bf16 dequantization (Int4Linear.prefill_weight),
and what the candidates for a faster prefill cost: a bf16 GEMM on a resident bf16/int8 copy, and W8A8
(torch._int_mm on int8 rows, activations quantized per row, scaled back in float32), with and without
its quantization passes. Random weights: the kernels do the same work whatever the values. Forms run
in turn within each repetition, so load from other processes hits all alike; `uptime` is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import arbor_torch  # noqa: F401 -- before torch work: it sets OpenMP's spin count
import torch
import torch.nn.functional as F
from arbor_torch import quantize as Q

SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # q/k/v, o, gate/up, down (N, K)
LAYERS = 28


def activations_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(rows / scale).to(torch.int8), scale


def forms(n: int, k: int, rows: int) -> dict:
    w = torch.randn(n, k) * 0.02
    int4, (q8, s8) = Q.Int4Linear(w), Q.quantize_int8(w)
    x = torch.randn(rows, k)
    xb, wb, (xq, xs) = x.bfloat16(), int4.prefill_weight(), activations_int8(x)
    return {
        "int4 today (dequant + bf16 GEMM)": lambda: int4(x),
        "int8 rows -> bf16 + GEMM": lambda: F.linear(xb, q8.to(torch.bfloat16) * s8[:, None]),
        "bf16 GEMM alone": lambda: F.linear(xb, wb),
        "W8A8 _int_mm alone": lambda: torch._int_mm(xq, q8.t()),
        "W8A8 with quantize + rescale": lambda: torch._int_mm(activations_int8(x)[0], q8.t()) * (xs * s8.float()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    table = [(n, k, forms(n, k, args.rows)) for n, k in SHAPES]
    best: dict = {}
    for rep in range(args.reps + 1):  # repetition 0 warms up
        for n, k, fns in table:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    best[n, k, name] = min(best.get((n, k, name), 1e9), time.perf_counter() - t0)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}, {args.rows} rows, best of {args.reps}")
    for name in table[0][2]:
        per = [best[n, k, name] * 1e3 for n, k, _ in table]
        print(f"{name:34s} " + "  ".join(f"{n}x{k} {t:6.1f} ms" for (n, k, _), t in zip(table, per))
              + f"  | x{LAYERS} layers {sum(per) * LAYERS / 1e3:5.2f} s")


if __name__ == "__main__":
    main()
