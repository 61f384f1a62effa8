"""One process's CPU-default speed, for ab_trees.py --speed: run with a tree's PYTHONPATH, it loads the
default model as `arbor` does (int4 + the compiled decode step on a CPU), times a 512-token prefill six
times and TOKENS decode steps three times after it, and prints the best of each as JSON. The best of
several in one process sets aside the stalls a shared machine adds; the ratio of two trees comes from
many such processes, alternating. Works on trees from before the ground package (arbor_cli.backend)."""

import json
import sys
import time

import numpy as np

import arbor_cli

try:
    from arbor_core.backend import SamplingParams
except ImportError:  # a tree from before core/
    from arbor_cli.backend import SamplingParams

PROMPT_TOKENS = 512


def best_seconds(run, times: int) -> float:
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def main(tokens: int) -> None:
    model = arbor_cli.load(quiet=True)
    lm, greedy = model.lm, SamplingParams()
    prompt = np.random.default_rng(0).integers(100, model.config.vocab_size - 100, PROMPT_TOKENS).tolist()
    cache = model.new_cache(PROMPT_TOKENS + tokens + 16)
    state = {"token": lm.sample(lm.prefill(prompt, cache, model.prefill_chunk), greedy, None)}  # warm-up

    def prefill():
        cache.truncate(0)
        state["token"] = lm.sample(lm.prefill(prompt, cache, model.prefill_chunk), greedy, None)

    def decode():
        cache.truncate(PROMPT_TOKENS)
        for _ in range(tokens):
            state["token"] = lm.sample(lm.decode(state["token"], cache), greedy, None)

    prefill_s = best_seconds(prefill, 6)
    decode_s = best_seconds(decode, 3)
    print(json.dumps({"prefill_tok_s": PROMPT_TOKENS / prefill_s, "decode_tok_s": tokens / decode_s,
                      "weights": f"{lm.dtype}/{lm.quantize}", "compiled": getattr(lm, "compiled", None) is not None}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
