"""The structured-output validity suite's counts per backend (issue 29; the cases: tests/schema_cases.py).

Answers every case (50 schemas x prompts, 4 json_object) with the default model and judges each answer with
jsonschema: on torch (the CPU default: int4 + the compiled step), on MLX, through `arbor serve` with the
official openai client's response_format, and on torch without the mask (the control, read strictly and by
its first {...}). Prints one JSON object: per run, the verdicts' counts, answer tokens and seconds.
Usage: python benchmarks/schema_validity.py [torch] [mlx] [serve] [control]   (default: all four)
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import arbor_cli
import arbor_weights

_spec = importlib.util.spec_from_file_location("schema_cases", Path(__file__).parents[1] / "tests" / "schema_cases.py")
schema_cases = sys.modules["schema_cases"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(schema_cases)
CASES = schema_cases.cases()


def run_model(model, masked: bool) -> dict:
    strict, kinder, tokens, t0 = Counter(), Counter(), 0, time.perf_counter()
    for c in CASES:
        r = model.chat([{"role": "user", "content": c.prompt}], max_new_tokens=schema_cases.MAX_TOKENS,
                       temperature=c.temperature, seed=c.seed, schema=c.schema_option if masked else None)
        strict[schema_cases.judge(r.text, c.schema)] += 1
        if not masked:
            kinder[schema_cases.judge(schema_cases.first_json(r.text), c.schema)] += 1
        tokens += len(r.tokens)
    out = {"cases": len(CASES), "verdicts": dict(strict), "answer_tokens": tokens,
           "seconds": round(time.perf_counter() - t0, 1)}
    if not masked:
        out["first_object_verdicts"] = dict(kinder)
    return out


def run_serve(checkpoint) -> dict:
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "arbor_cli", "serve", "--model", str(checkpoint.path), "--port",
                             str(port), "--context", "4096"], stderr=subprocess.DEVNULL,
                            env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        verdicts, tokens, t0 = Counter(), 0, time.perf_counter()
        for c in CASES:
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": c.prompt}],
                temperature=c.temperature, seed=c.seed, max_tokens=schema_cases.MAX_TOKENS,
                response_format=c.response_format)
            verdict = schema_cases.judge(reply.choices[0].message.content, c.schema)
            verdicts[verdict if reply.choices[0].finish_reason == "stop" else "cut short"] += 1
            tokens += reply.usage.completion_tokens
        return {"cases": len(CASES), "verdicts": dict(verdicts), "answer_tokens": tokens,
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    runs = sys.argv[1:] or ["torch", "mlx", "serve", "control"]
    checkpoint = arbor_weights.resolve(arbor_weights.DEFAULT_MODEL, quiet=True)
    out = {"load_average_start": os.getloadavg()}
    if {"torch", "control"} & set(runs):
        model = arbor_cli.load(str(checkpoint.path), backend="torch", device="cpu", quiet=True)
        model.generate("Hi", max_new_tokens=2, ignore_eos=True)
        if "torch" in runs:
            out["torch"] = run_model(model, masked=True)
        if "control" in runs:
            out["torch, no mask"] = run_model(model, masked=False)
    if "mlx" in runs:
        out["mlx"] = run_model(arbor_cli.load(str(checkpoint.path), backend="mlx", quiet=True), masked=True)
    if "serve" in runs:
        out["serve (openai client)"] = run_serve(checkpoint)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
