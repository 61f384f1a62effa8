"""Resident memory while chatting: arbor beside llama.cpp, same GGUF, same context, each in its own process.

    python benchmarks/chat_memory.py [--gguf PATH] [--context 8192] [--turns 3] [--max-tokens 32]
        [--dtype float32] [--quantize int4] [--threads N] [--json [PATH]]
    python benchmarks/chat_memory.py --gguf build/bench/smollm2-1.7b-random.Q4_1.gguf  # make_random_gguf.py

Each engine runs in a fresh subprocess (this script with --worker), so one's memory never counts
for the other: load the model with a --context-token context, then --turns chat turns of up to
--max-tokens greedy tokens through the model's chat template (arbor: arbor_cli.load(..., context=N)
and a ChatSession, the `arbor chat` path; llama.cpp: Llama(n_ctx=N) and create_chat_completion).
Reported per engine: RSS after loading, peak RSS (getrusage ru_maxrss: the process's whole life,
imports and load included), current RSS and USS (psutil) after the turns. arbor runs its default
configuration unless --dtype / --quantize say otherwise; the shell's ARBOR_* settings are dropped.
llama.cpp maps the GGUF: the pages it has touched count in its RSS, as arbor's loaded weights do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import report_json  # benchmarks/report_json.py, beside this script

TURNS = ["Hi! Who are you?", "What is the capital of France?", "Tell me one fact about its history.",
         "And one about its food?", "Thanks. Summarise what we said."]


def memory_now() -> dict[str, int]:
    """RSS and USS (pages no other process shares) of this process, now."""
    import psutil

    info = psutil.Process().memory_full_info()
    return {"rss": info.rss, "uss": info.uss}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measured(loaded: dict, engine: str, weights_bytes: int, context: int, tokens: list[int],
             replies: list[str]) -> dict:
    after = memory_now()  # called while the model and its cache are alive
    return {"engine": engine, "weights_bytes": weights_bytes, "context": context, "loaded_rss": loaded["rss"],
            "rss_after": after["rss"], "uss_after": after["uss"], "generated_tokens": tokens, "replies": replies}


def arbor_worker(args) -> dict:
    import arbor_torch  # noqa: F401 -- before torch: it sets OpenMP's spin count, read when torch loads
    import torch

    import arbor_cli
    from arbor_cli.chat import ChatSession
    from arbor_cli.generate import GenerationOptions

    torch.set_num_threads(args.threads)
    model = arbor_cli.load(args.gguf, backend="torch", device="cpu", quiet=True, context=args.context,
                           dtype=args.dtype, quantize=args.quantize)
    loaded = memory_now()
    session = ChatSession(model, options=GenerationOptions(max_new_tokens=args.max_tokens), context=args.context)
    replies, tokens = [], []
    for text in TURNS[:args.turns]:
        replies.append("".join(session.send(text)))
        tokens.append(len(session.last_result.tokens))
    lm = model.lm
    engine = f"arbor ({lm.dtype}{', ' + lm.quantize if lm.quantize else ''})"
    return {**measured(loaded, engine, lm.weights_nbytes, session.context, tokens, replies), "torch": torch.__version__}


def llama_worker(args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.context, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    loaded = memory_now()
    messages, replies, tokens = [], [], []
    for text in TURNS[:args.turns]:
        messages.append({"role": "user", "content": text})
        r = llm.create_chat_completion(messages, max_tokens=args.max_tokens, temperature=0.0)
        reply = r["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
        tokens.append(r["usage"]["completion_tokens"])
    weights = int(llama_cpp.llama_model_size(llm.model))
    return {**measured(loaded, "llama.cpp", weights, llm.n_ctx(), tokens, replies),
            "llama_cpp_python": llama_cpp.__version__}


def run_worker(engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--gguf", args.gguf, "--context", str(args.context),
           "--turns", str(args.turns), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--quantize", args.quantize] if args.quantize else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"chat_memory: the {engine} worker exited {p.returncode}:\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file (default: the default model's, downloaded once)")
    ap.add_argument("--context", type=int, default=8192, help="context length for both engines")
    ap.add_argument("--turns", type=int, default=3, choices=range(1, len(TURNS) + 1))
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reply at most")
    ap.add_argument("--dtype", help="arbor dtype (default: arbor's default configuration)")
    ap.add_argument("--quantize", help="arbor quantize mode (default: arbor's default configuration)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="raw results as JSON: to PATH (the table still prints), or alone to stdout instead")
    ap.add_argument("--worker", choices=("arbor", "llama.cpp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gguf is None:
        import arbor_weights

        args.gguf = str(arbor_weights.default_gguf_path(quiet=True))
    if args.worker:
        result = (arbor_worker if args.worker == "arbor" else llama_worker)(args)
        print(json.dumps({**result, "peak_rss": peak_rss()}))
        return

    rows = [run_worker("llama.cpp", args), run_worker("arbor", args)]
    llama, arbor = rows
    report = {"gguf": os.path.basename(args.gguf), "gguf_bytes": os.path.getsize(args.gguf), "context": args.context,
              "turns": args.turns, "max_tokens": args.max_tokens, "threads": args.threads,
              "python": platform.python_version(), "torch": arbor.get("torch"),
              "llama_cpp_python": llama.get("llama_cpp_python"),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
              "peak_rss_ratio": arbor["peak_rss"] / llama["peak_rss"],
              "rss_after_ratio": arbor["rss_after"] / llama["rss_after"]}
    if report_json.emit(report, args.json):
        return
    mib = 1 << 20
    print(f"{report['gguf']} ({report['gguf_bytes'] / mib:,.0f} MiB) · context {args.context:,} · {args.turns} turns "
          f"of <= {args.max_tokens} tokens · {args.threads} threads · torch {report['torch']} · llama-cpp-python "
          f"{report['llama_cpp_python']} · {report['date']}")
    print("\n| engine | context | after load RSS | peak RSS | RSS after the turns | USS after | weights "
          "| tokens per turn |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for r in (arbor, llama):
        print(f"| {r['engine']} | {r['context']:,} | {r['loaded_rss'] / mib:,.0f} MiB | {r['peak_rss'] / mib:,.0f} MiB "
              f"| {r['rss_after'] / mib:,.0f} MiB | {r['uss_after'] / mib:,.0f} MiB | {r['weights_bytes'] / mib:,.0f} MiB "
              f"| {', '.join(map(str, r['generated_tokens']))} |")
    print(f"\narbor / llama.cpp: peak RSS {report['peak_rss_ratio']:.2f}x, RSS after the turns "
          f"{report['rss_after_ratio']:.2f}x")
    for r in (arbor, llama):
        print(f"{r['engine']} replies: " + " | ".join(repr(x[:60]) for x in r["replies"]))


if __name__ == "__main__":
    main()
