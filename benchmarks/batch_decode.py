"""Decode throughput of B sequences stepped together (Model.batch / LoadedModel.step_rows), B = 1, 2, 4, …:
each sequence holds `--context-tokens` tokens, then `--steps` decode steps of all B are timed (one token each a
step). Prints one JSON object: per B, ms a step and total tokens/s, beside one sequence's own decode (the
compiled CPU step or the CUDA graph). Any backend and device `arbor_cli.load` takes.

    python benchmarks/batch_decode.py                                  # the default model, CPU
    python benchmarks/batch_decode.py --device cuda --batches 1,8,16,32,64 --context-tokens 4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

WARM_STEPS = 20

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--context-tokens", type=int, default=200, help="tokens each sequence holds before timing")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import arbor_cli
    from arbor_core.planner import BUCKETS

    kw = {k: v for k, v in (("backend", args.backend), ("device", args.device), ("dtype", args.dtype)) if v}
    model = arbor_cli.load(args.model, quiet=True, **kw)
    lm = model.lm
    context = next(b for b in BUCKETS if b > args.context_tokens + args.steps + WARM_STEPS + 8)
    rope = model.rope_tables(context)
    prompt = [(7 * i) % (model.config.vocab_size - 10) + 5 for i in range(args.context_tokens)]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        caches = lm.new_caches(batch, context, rope)
        for cache in caches:  # each alone: the prompt's prefill is not what is measured
            lm.prefill(prompt, cache, model.prefill_chunk)
        token = [5] * batch
        for _ in range(WARM_STEPS):  # shapes, kernels; one sequence's compiled CPU step opens from the 17th decode
            lm.step_rows([[t] for t in token], caches)
        _sync(lm)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            logits = lm.step_rows([[t] for t in token], caches)
        _sync(lm, logits)
        seconds = (time.perf_counter() - t0) / args.steps
        rows.append({"batch": batch, "ms_per_step": round(seconds * 1e3, 2),
                     "tokens_per_s": round(batch / seconds, 1)})
        del caches
    one = rows[0]["tokens_per_s"] if rows and rows[0]["batch"] == 1 else None
    for row in rows:
        row["vs_one"] = round(row["tokens_per_s"] / one, 2) if one else None
    report = {"model": model.checkpoint.name, "backend": model.backend, "device": str(lm.device), "dtype": lm.dtype,
              "quantize": lm.quantize, "context_tokens": args.context_tokens, "cache_context": context,
              "steps": args.steps, "rows": rows, "load_average": [round(x, 2) for x in os.getloadavg()]}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


def _sync(lm, logits=None) -> None:
    """Wait for the device: a CUDA stream or MLX's lazy graph."""
    if logits is not None and hasattr(logits, "item") and type(logits).__module__.startswith("mlx"):
        import mlx.core as mx

        mx.eval(logits)
    if str(lm.device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
