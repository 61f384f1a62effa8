"""Load on `arbor serve` over loopback: N concurrent clients send a fixed number of requests each, then
stop. Every request must come back answered (200) or refused (503, the queue full), nothing lost or
hung; prints one JSON object with the counts, throughput and latency percentiles.

    python benchmarks/serve_load.py --clients 8 --requests 5 --queue-size 4 --max-tokens 16
    python benchmarks/serve_load.py --clients 32 --leaving 8 --orphan --requests 2 --queue-size 16
    python benchmarks/serve_load.py --clients 16 --requests 2 --queue-size 16 --max-tokens 64 --stream --parallel 8

--parallel N: the server's --parallel (default: the server's own default); --stream: requests stream, and
the report adds each request's time to its first token (p50/p99) and the total generated tokens per second.

--leaving N: N of the clients each open one long stream (2,000 tokens, EOS ignored) and leave after its
first events, instead of their requests; they count as left, not lost. --orphan: first, on the idle
server, one non-streaming request for 2,000 tokens whose client gives up after 3 s (curl -m 3); reports
how long after that the server's slot was free again (/health not busy). Lost = a request of a staying
client that came back neither answered (200) nor refused (503).
Starts its own server (the default model, or --model) on a free port and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.",
           "What is two plus two?", "Name an animal.", "What is water made of?", "Name a planet."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "arbor_cli", "serve", "--port", str(port), "--queue-size", str(args.queue_size)]
    if args.parallel is not None:
        command += ["--parallel", str(args.parallel)]
    if args.model:
        command += ["--model", args.model]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("arbor serve did not start")


def client(url: str, index: int, args, results: list, lock: threading.Lock) -> None:
    with httpx.Client(timeout=args.timeout) as http:
        for r in range(args.requests):
            body = {"messages": [{"role": "user", "content": PROMPTS[(index + r) % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            first, tokens = None, 0
            try:
                if args.stream:
                    status, well_formed, first, tokens = streamed(http, url, body, t0)
                else:
                    response = http.post(f"{url}/v1/chat/completions", json=body)
                    status = response.status_code
                    ok = status == 200 and bool(response.json()["choices"][0]["message"]["content"] is not None)
                    well_formed = ok or ("error" in response.json())
                    tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            except (httpx.HTTPError, ValueError, KeyError) as e:
                status, well_formed = f"{type(e).__name__}", False
            with lock:
                results.append({"status": status, "seconds": time.perf_counter() - t0, "well_formed": well_formed,
                                "first_token_s": first, "tokens": tokens})


def streamed(http: httpx.Client, url: str, body: dict, t0: float) -> tuple:
    """A streamed request: (status, well formed, seconds to the first content, completion tokens)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    first, tokens, done = None, 0, False
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, "error" in response.json(), None, 0
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - t0
    return 200, done, first, tokens


def leaver(url: str, args, results: list, lock: threading.Lock) -> None:
    """One long stream, left after its first events (or its first 30 s, whichever comes first)."""
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=args.timeout) as response:
            status = response.status_code
            for i, _ in enumerate(response.iter_lines()):
                if i >= 3 or time.perf_counter() - t0 > 30:
                    break
    except httpx.HTTPError as e:
        status = type(e).__name__
    with lock:
        results.append({"status": status, "seconds": time.perf_counter() - t0, "well_formed": True, "left": True})


def orphan(url: str) -> dict:
    """A non-streaming request for 2,000 tokens whose client gives up after 3 s; how long the server then
    takes to free its slot."""
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 2000,
            "ignore_eos": True}
    before = httpx.get(f"{url}/health", timeout=5).json()
    try:
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3.0)
        return {"orphan": "answered within 3 s: not an orphan"}
    except httpx.TimeoutException:
        left = time.perf_counter()
    while time.perf_counter() - left < 120:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if not health["busy"]:
            return {"orphan_freed_s": round(time.perf_counter() - left, 2),
                    "orphan_cancelled": health["cancelled"] - before["cancelled"]}
        time.sleep(0.05)
    return {"orphan_freed_s": None, "orphan": "still busy 120 s after its client left"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--model", default=None)
    parser.add_argument("--leaving", type=int, default=0, help="clients that open a long stream and leave")
    parser.add_argument("--orphan", action="store_true", help="first, one non-streaming request left after 3 s")
    parser.add_argument("--parallel", type=int, default=None, help="the server's --parallel")
    parser.add_argument("--stream", action="store_true", help="stream; report time to first token")
    args = parser.parse_args()
    port = free_port()
    server = start(args, port)
    url = f"http://127.0.0.1:{port}"
    results: list[dict] = []
    lock = threading.Lock()
    try:
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2}, timeout=600)  # warm: not counted
        orphaned = orphan(url) if args.orphan else {}
        t0 = time.perf_counter()
        threads = [threading.Thread(target=leaver, args=(url, args, results, lock)) if i < args.leaving else
                   threading.Thread(target=client, args=(url, i, args, results, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        deadline = time.time() + 60  # the leavers' streams are cancelled between two tokens
        while (health := httpx.get(f"{url}/health", timeout=5).json())["busy"] and time.time() < deadline:
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    staying = [r for r in results if not r.get("left")]
    answered = sorted(r["seconds"] for r in staying if r["status"] == 200)
    refused = [r for r in staying if r["status"] == 503]
    other = [r for r in staying if r["status"] not in (200, 503)]

    def pct(q: float, values: list | None = None) -> float | None:
        values = answered if values is None else values
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    firsts = sorted(r["first_token_s"] for r in staying if r.get("first_token_s") is not None)
    generated = sum(r.get("tokens", 0) for r in staying if r["status"] == 200)

    report = {"clients": args.clients, "requests": len(staying), "sent": (args.clients - args.leaving) * args.requests,
              "left_early": len(results) - len(staying), "answered": len(answered), "refused_503": len(refused),
              "lost": len(other), **orphaned,
              "all_well_formed": all(r["well_formed"] for r in results), "wall_s": round(wall, 2),
              "answered_per_s": round(len(answered) / wall, 2), "p50_s": pct(0.5), "p99_s": pct(0.99),
              "mean_s": round(statistics.mean(answered), 3) if answered else None,
              "generated_tokens": generated, "tokens_per_s": round(generated / wall, 2),
              "first_token_p50_s": pct(0.5, firsts), "first_token_p99_s": pct(0.99, firsts),
              "parallel": args.parallel, "server": health,
              "queue_size": args.queue_size, "max_tokens": args.max_tokens,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0 if report["sent"] == report["requests"] and not other else 1


if __name__ == "__main__":
    sys.exit(main())
