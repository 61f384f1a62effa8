"""CPU decode and prefill: arbor's default configuration beside llama.cpp on the same GGUF, in one process.

    python benchmarks/cpu_bench.py [--gguf PATH] [--threads N] [--reps 5] [--prompt-tokens 512] [--decode 128]
        [--prefill-tokens 512] [--modes float32,int8,int4] [--parity] [--json [PATH]]
    python benchmarks/cpu_bench.py --reps 5 --modes float32 --parity --json build/bench/cpu_bench.json
    python benchmarks/cpu_bench.py --gguf build/bench/smollm2-1.7b-random.Q4_1.gguf --reps 3  # make_random_gguf.py

"arbor default" is `arbor_cli.load(gguf, backend="torch", device="cpu")` with no dtype or quantize:
what a user gets without flags. --modes adds arbor configurations: a dtype (float32, the exact path)
or a quantize mode (int8, int4), or both as dtype+quantize (float32+int4); "aten" loads with arbor's
integer kernels off (PyTorch's int4/int8 kernels, as before them), "eager" without the compiled decode
step, each alone or joined to the others with "+" (e.g. aten, eager, aten+eager). Each repetition runs every
engine once, in turn (llama.cpp, arbor default, the modes), so load from other processes hits all of
them alike; the table reports medians and min..max over the repetitions, llama.cpp being 1.00x.

Decode: greedy tokens after a --prompt-tokens prompt (prefilled, not timed); the first step after the
prompt is not timed either (per-cache set-up lands there), the clock runs over the --decode steps
after it. Prefill: a --prefill-tokens prompt into an empty cache, up to the first greedy token. Both
prompts are random token ids drawn fresh every repetition (the same for every engine within one):
a repeated prompt would let a prefix cache fake the prefill, and the kernels do the same work
whatever the text. Greedy is an argmax of the last logits on both sides; every engine first runs
one short untimed warm-up (compilation, allocation). llama.cpp runs through llama-cpp-python
(n_threads = n_threads_batch = --threads), a benchmark-only dependency (pip install llama-cpp-python).

--parity: for the default model's parity prompts (tests/reference/test_default_model_parity.py) and
two chat-template prompts, 32 greedy tokens (to the first end-of-turn) from llama.cpp, arbor default
and arbor float32, fed the same token ids; reports which sequences are identical and where the
first difference is. Random-weights GGUFs give noise text: parity there says little.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import numpy as np
import report_json  # benchmarks/report_json.py, beside this script
import torch

import arbor_cli
import arbor_torch  # noqa: F401 -- before torch: it sets OpenMP's spin count, read when torch loads
import arbor_weights
from arbor_cli.model import QUANTIZE
from arbor_core.backend import SamplingParams

GREEDY = SamplingParams()
WARMUP_PROMPT, WARMUP_STEPS = 64, 8
PARITY_TOKENS = 32
PARITY_PROMPTS = [  # tests/reference/test_default_model_parity.py, as raw text (no template, no BOS)
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Photosynthesis is the process by which plants",
]
PARITY_CHATS = ["What is the capital of France?", "Name the three primary colors."]  # through the chat template
DTYPES = ("float32", "bfloat16", "float16")
SWITCHES = ("aten", "eager")  # load-time switches a mode may add (parse_mode)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def parse_mode(mode: str) -> dict:
    """'float32' -> dtype, 'int4' -> quantize, 'float32+int4' -> both; 'aten' (PyTorch's int4/int8 kernels instead
    of arbor's integer kernels) and 'eager' (no compiled decode step) combine with either."""
    kw = {}
    for part in mode.split("+"):
        if part in SWITCHES:
            kw[part] = True
            continue
        key = "dtype" if part in DTYPES else "quantize" if part in QUANTIZE else None
        if key is None or key in kw:
            sys.exit(f"cpu_bench: bad mode {mode!r}: use a dtype ({', '.join(DTYPES)}), a quantize mode "
                     f"({', '.join(QUANTIZE)}) or dtype+quantize")
        kw[key] = part
    return kw


@contextlib.contextmanager
def env_set(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


class Arbor:
    def __init__(self, gguf: str, label: str, aten: bool = False, eager: bool = False, **kw):
        from arbor_torch import integer_kernels

        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if aten:
                stack.enter_context(integer_kernels.turned_off())
            if eager:
                stack.enter_context(env_set("ARBOR_COMPILE", "0"))
            self.model = arbor_cli.load(gguf, backend="torch", device="cpu", quiet=True, **kw)
        self.load_s = time.perf_counter() - t0
        self.lm = self.model.lm
        self.name = f"{label} ({self.lm.dtype}{', ' + self.lm.quantize if self.lm.quantize else ''})"
        self.kwargs = {**kw, **({"aten": True} if aten else {}), **({"eager": True} if eager else {})}
        self.weights_bytes = self.lm.weights_nbytes

    def greedy(self, prompt: list[int], n: int, capacity: int) -> tuple[list[int], float, float]:
        """n greedy tokens after `prompt`: (tokens, seconds to the first, seconds of steps 3..n)."""
        cache = self.model.new_cache(capacity)
        t0 = time.perf_counter()
        token = self.lm.sample(self.lm.prefill(prompt, cache, self.model.prefill_chunk), GREEDY, None)
        t1 = time.perf_counter()
        out = [token]
        if n > 1:
            out.append(self.lm.sample(self.lm.decode(out[-1], cache), GREEDY, None))
        t2 = time.perf_counter()
        for _ in range(n - 2):
            out.append(self.lm.sample(self.lm.decode(out[-1], cache), GREEDY, None))
        return out, t1 - t0, time.perf_counter() - t2


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: str, threads: int, n_ctx: int):
        try:
            import llama_cpp
        except ImportError:
            sys.exit("cpu_bench: llama-cpp-python is not installed (pip install llama-cpp-python); "
                     "it is the peer this benchmark compares with")
        self.llama_cpp = llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.vocab = self.llm.n_vocab()
        self.weights_bytes = int(llama_cpp.llama_model_size(self.llm.model))

    def _argmax(self) -> int:
        # llama-cpp-python 0.3 no longer copies logits into .scores (unless logits_all): read the last row
        row = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.vocab,))))

    def greedy(self, prompt: list[int], n: int, capacity: int) -> tuple[list[int], float, float]:
        self.llm.reset()  # n_tokens = 0: eval() drops the whole KV cache, nothing of the last prompt is reused
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        out = [self._argmax()]
        t1 = time.perf_counter()
        if n > 1:
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        t2 = time.perf_counter()
        for _ in range(n - 2):
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        return out, t1 - t0, time.perf_counter() - t2


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token that differs (a length when one ends early); None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parity(engines: dict, model, capacity: int) -> dict:
    """Greedy tokens of each engine on the same ids, cut before the first end-of-turn token."""
    tok = model.tokenizer
    prompts = [(p, tok.encode(p)) for p in PARITY_PROMPTS]
    prompts += [(f"chat: {c}", tok.encode_chat([{"role": "user", "content": c}])) for c in PARITY_CHATS]
    eos = set(tok.eos_ids)
    pairs = [(a, b) for i, a in enumerate(engines) for b in list(engines)[i + 1:]]
    rows = []
    for text, ids in prompts:
        outs = {}
        for name, e in engines.items():
            out = e.greedy(ids, PARITY_TOKENS, capacity)[0]
            cut = next((i for i, t in enumerate(out) if t in eos), len(out))
            outs[name] = out[:cut]
        rows.append({"prompt": text, "prompt_tokens": len(ids), "tokens": outs,
                     "text": {k: tok.decode(v) for k, v in outs.items()},
                     "first_difference": {f"{a} vs {b}": first_difference(outs[a], outs[b]) for a, b in pairs}})
    summary = {f"{a} vs {b}": sum(r["first_difference"][f"{a} vs {b}"] is None for r in rows) for a, b in pairs}
    return {"tokens": PARITY_TOKENS, "prompts": len(rows), "identical": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file (default: the default model's, downloaded once)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every engine")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt tokens before the decode run")
    ap.add_argument("--decode", type=int, default=128, help="timed greedy decode steps per run")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per prefill run")
    ap.add_argument("--modes", default="", help="extra arbor configurations, e.g. float32,int8 or float32+int4")
    ap.add_argument("--parity", action="store_true", help="greedy-parity section (default model's prompts)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="raw runs as JSON: to PATH (the table still prints), or alone to stdout instead")
    args = ap.parse_args()
    if args.decode < 1 or args.prompt_tokens < 1 or args.prefill_tokens < 1:
        sys.exit("cpu_bench: --decode, --prompt-tokens and --prefill-tokens must be at least 1")
    gguf = args.gguf or str(arbor_weights.default_gguf_path(quiet=True))
    torch.set_num_threads(args.threads)
    load_before = load_average()
    capacity = max(args.prompt_tokens + args.decode + 2, args.prefill_tokens + 1, WARMUP_PROMPT + WARMUP_STEPS,
                   256 + PARITY_TOKENS if args.parity else 0)
    capacity = -(-capacity // 256) * 256  # llama.cpp pads n_ctx to 256; both engines get the same capacity

    engines = [LlamaCpp(gguf, args.threads, capacity), Arbor(gguf, "arbor default")]
    for mode in filter(None, args.modes.split(",")):
        engines.append(Arbor(gguf, f"arbor {mode}", **parse_mode(mode)))
    model = engines[1].model
    vocab = model.config.vocab_size
    for e in engines:  # untimed: kernel selection, compilation, first allocations
        t0 = time.perf_counter()
        e.greedy(np.random.default_rng([args.seed, 1 << 20]).integers(100, vocab - 100, WARMUP_PROMPT).tolist(),
                 WARMUP_STEPS, capacity)
        e.warmup_s = time.perf_counter() - t0
        print(f"{e.name}: loaded in {e.load_s:.1f} s, warm-up {e.warmup_s:.1f} s", file=sys.stderr, flush=True)

    runs = {e.name: {"decode_tok_s": [], "prefill_s": []} for e in engines}
    texts: dict[str, str] = {}
    for rep in range(args.reps):
        rng = np.random.default_rng([args.seed, rep])  # fresh prompts each repetition, the same for every engine
        prompt = rng.integers(100, vocab - 100, args.prompt_tokens).tolist()
        prefill_ids = rng.integers(100, vocab - 100, args.prefill_tokens).tolist()
        for e in engines:  # alternate: contention from other processes lands on every engine alike
            out, _, decode_s = e.greedy(prompt, args.decode + 2, capacity)
            _, prefill_s, _ = e.greedy(prefill_ids, 1, capacity)
            runs[e.name]["decode_tok_s"].append(args.decode / decode_s)
            runs[e.name]["prefill_s"].append(prefill_s)
            texts[e.name] = model.tokenizer.decode(out[:16])
            print(f"rep {rep + 1}/{args.reps} {e.name}: decode {args.decode / decode_s:.1f} tok/s, "
                  f"prefill {prefill_s:.2f} s", file=sys.stderr, flush=True)

    ref = runs["llama.cpp"]
    ref_decode, ref_prefill = statistics.median(ref["decode_tok_s"]), statistics.median(ref["prefill_s"])
    rows = []
    for e in [engines[1], engines[0], *engines[2:]]:  # the default first, then its baseline
        r = runs[e.name]
        decode, prefill = spread(r["decode_tok_s"]), spread(r["prefill_s"])
        rows.append({"engine": e.name, "load_kwargs": getattr(e, "kwargs", None),
                     "decode_tok_s": decode, "decode_vs_llama_cpp": decode["median"] / ref_decode,
                     "prefill_s": prefill, "prefill_tok_s": args.prefill_tokens / prefill["median"],
                     "prefill_vs_llama_cpp": ref_prefill / prefill["median"], "runs": r,
                     "weights_bytes": e.weights_bytes, "load_s": e.load_s, "warmup_s": e.warmup_s,
                     "greedy_text_rep_last": texts[e.name]})

    parity_report = None
    if args.parity:
        fp32 = next((e for e in engines[2:] if e.kwargs == {"dtype": "float32"}), None)
        fp32 = fp32 or Arbor(gguf, "arbor float32", dtype="float32")
        parity_report = parity({"llama.cpp": engines[0], "arbor default": engines[1], "arbor float32": fp32},
                               model, capacity)

    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "llama_cpp_python": engines[0].llama_cpp.__version__, "python": platform.python_version(),
              "arbor_default": {"dtype": engines[1].lm.dtype, "quantize": engines[1].lm.quantize},
              # one libgomp serves torch and llama.cpp in this process: both run with these
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "gguf": os.path.basename(gguf), "gguf_bytes": os.path.getsize(gguf), "capacity": capacity,
              "reps": args.reps, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode,
              "prefill_tokens": args.prefill_tokens, "seed": args.seed,
              "load_average_before": load_before, "load_average_after": load_average(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "parity": parity_report}
    if report_json.emit(report, args.json):
        return
    print_report(report)


def print_report(report: dict) -> None:
    print(f"{report['cpu']} · {report['cores']} cores · {report['threads']} threads · torch {report['torch']} · "
          f"llama-cpp-python {report['llama_cpp_python']} · {report['date']}")
    print(f"{report['gguf']} ({report['gguf_bytes'] / 1e6:,.0f} MB) · {report['reps']} reps · decode: "
          f"{report['decode_tokens']} steps after a {report['prompt_tokens']}-token prompt · load avg "
          f"{report['load_average_before']} -> {report['load_average_after']}")
    n = report["prefill_tokens"]
    print(f"\n| engine | decode tok/s | min..max | vs llama.cpp | {n}-token prefill | min..max | prefill tok/s "
          "| vs llama.cpp | weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        d, p = r["decode_tok_s"], r["prefill_s"]
        print(f"| {r['engine']} | {d['median']:.1f} | {d['min']:.1f}..{d['max']:.1f} | {r['decode_vs_llama_cpp']:.2f}x "
              f"| {p['median']:.2f} s | {p['min']:.2f}..{p['max']:.2f} | {r['prefill_tok_s']:,.0f} "
              f"| {r['prefill_vs_llama_cpp']:.2f}x | {r['weights_bytes'] / 1e6:,.0f} MB |")
    par = report["parity"]
    if not par:
        return
    print(f"\nGreedy parity: {par['tokens']} tokens (to the first end-of-turn), the same ids into every engine")
    for pair, same in par["identical"].items():
        print(f"  {pair}: {same}/{par['prompts']} identical")
    print("| prompt | " + " | ".join(par["rows"][0]["first_difference"]) + " |")
    print("|---|" + "---:|" * len(par["rows"][0]["first_difference"]))
    for r in par["rows"]:
        cells = ["same" if i is None else f"differ at {i}" for i in r["first_difference"].values()]
        print(f"| {r['prompt'][:40]!r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
