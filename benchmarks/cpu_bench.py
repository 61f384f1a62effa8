"""CPU decode and prefill: arbor (fp32, int8, int4) beside llama.cpp on the same GGUF, in one process.

    python benchmarks/cpu_bench.py [--gguf PATH] [--threads N] [--reps 3] [--decode 128] [--prefill 512] [--json]

Each repetition runs every engine once, in turn (llama.cpp, arbor fp32, int8, int4), so load from other
processes hits all of them alike; the table reports each engine's median over the repetitions and
its ratio to llama.cpp. Decode: greedy tokens after a short prompt, timed after the first one.
Prefill: a fresh 512-token prompt of random ids (the kernels see the same work whatever the text).
llama.cpp runs through llama-cpp-python, a benchmark-only dependency (pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import arbor_torch  # noqa: F401 -- before torch: it sets OpenMP's spin count, read when torch loads
import numpy as np
import torch

import arbor_cli
import arbor_weights
from arbor_cli.backend import SamplingParams

PROMPT = "The history of the printing press begins"
GREEDY = SamplingParams()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


class Arbor:
    def __init__(self, gguf: str, quantize: str | None):
        self.name = f"arbor {quantize or 'fp32'}"
        self.model = arbor_cli.load(gguf, backend="torch", device="cpu", dtype="float32", quiet=True,
                                    quantize=quantize)
        self.lm = self.model.lm

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text)

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        cache = self.model.new_cache(1024)
        token = self.lm.sample(self.lm.prefill(prompt, cache, self.model.prefill_chunk), GREEDY, None)
        out = [token]
        token = self.lm.sample(self.lm.decode(token, cache), GREEDY, None)  # first step: warm-up, not timed
        out.append(token)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            token = self.lm.sample(self.lm.decode(token, cache), GREEDY, None)
            out.append(token)
        return (n - 1) / (time.perf_counter() - t0), out

    def prefill(self, ids: list[int]) -> float:
        cache = self.model.new_cache(1024)
        t0 = time.perf_counter()
        self.lm.sample(self.lm.prefill(ids, cache, self.model.prefill_chunk), GREEDY, None)
        return time.perf_counter() - t0


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: str, threads: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            sys.exit("cpu_bench: llama-cpp-python is not installed (pip install llama-cpp-python); "
                     "it is the peer this benchmark compares with")
        self.llm = Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _greedy(self) -> int:
        # llama-cpp-python 0.3 no longer copies logits into .scores (unless logits_all): read the last row
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.vocab,))))

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = [self._greedy()]
        self.llm.eval([out[-1]])  # warm-up step, as for arbor
        out.append(self._greedy())
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(self._greedy())
        return (n - 1) / (time.perf_counter() - t0), out

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._greedy()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file (default: the default model's, downloaded once)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every engine")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128, help="greedy tokens per decode run")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens per prefill run")
    ap.add_argument("--modes", default="fp32,int8,int4", help="arbor weight formats to run")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    gguf = args.gguf or str(arbor_weights.default_gguf_path(quiet=True))
    torch.set_num_threads(args.threads)
    load_before = load_average()

    engines = [LlamaCpp(gguf, args.threads)]
    for mode in args.modes.split(","):
        engines.append(Arbor(gguf, None if mode == "fp32" else mode))
    prompt = engines[1].tokenize(PROMPT)
    vocab = engines[1].model.config.vocab_size
    prefill_ids = np.random.default_rng(0).integers(100, vocab - 100, size=args.prefill).tolist()

    runs: dict[str, dict[str, list[float]]] = {e.name: {"decode": [], "prefill": []} for e in engines}
    texts: dict[str, str] = {}
    for rep in range(args.reps):
        for e in engines:  # alternate: contention from other processes lands on every engine alike
            tps, out = e.decode(prompt, args.decode)
            runs[e.name]["decode"].append(tps)
            runs[e.name]["prefill"].append(e.prefill(prefill_ids))
            texts[e.name] = engines[1].model.tokenizer.decode(out[:24])
            print(f"rep {rep + 1}/{args.reps} {e.name}: decode {tps:.1f} tok/s, prefill "
                  f"{runs[e.name]['prefill'][-1]:.2f} s", file=sys.stderr, flush=True)

    base = runs["llama.cpp"]
    ref_decode, ref_prefill = statistics.median(base["decode"]), statistics.median(base["prefill"])
    rows = []
    for e in engines:
        r = runs[e.name]
        decode, prefill = statistics.median(r["decode"]), statistics.median(r["prefill"])
        rows.append({"engine": e.name, "decode_tok_s": decode, "decode_runs": r["decode"],
                     "decode_vs_llama_cpp": decode / ref_decode, "prefill_s": prefill, "prefill_runs": r["prefill"],
                     "prefill_tok_s": args.prefill / prefill, "prefill_vs_llama_cpp": ref_prefill / prefill,
                     "weights_bytes": getattr(getattr(e, "lm", None), "weights_nbytes", None),
                     "greedy_text": texts[e.name]})
    import llama_cpp

    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
              # one libgomp serves torch and llama.cpp in this process: both run with these
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "gguf": os.path.basename(gguf),
              "reps": args.reps, "decode_tokens": args.decode, "prefill_tokens": args.prefill,
              "load_average_before": load_before, "load_average_after": load_average(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu']} · {report['cores']} cores · {args.threads} threads · torch {report['torch']} · "
          f"llama-cpp-python {report['llama_cpp_python']} · {report['gguf']} · load avg "
          f"{load_before:.2f} -> {report['load_average_after']:.2f}")
    print(f"| engine | decode tok/s | vs llama.cpp | {args.prefill}-token prefill | prefill tok/s | vs llama.cpp "
          "| weights |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        weights = f"{r['weights_bytes'] / 1e6:.0f} MB" if r["weights_bytes"] else "(GGUF)"
        print(f"| {r['engine']} | {r['decode_tok_s']:.1f} | {r['decode_vs_llama_cpp']:.2f}x | {r['prefill_s']:.2f} s "
              f"| {r['prefill_tok_s']:.0f} | {r['prefill_vs_llama_cpp']:.2f}x | {weights} |")


if __name__ == "__main__":
    main()
