"""`arbor summarize --engine URL --parallel N` against an engine that runs requests concurrently: the
wall time of the whole summary with N = 1, 2, 4, 8 on the same document, and whether the summaries
are the same.

No concurrent engine was available here (vLLM is not on the lent GPU machine, and a 2-core CPU gives
a batching server nothing to batch with), so by default the engine is a stand-in: an OpenAI-compatible
server in this process that answers every request after --latency seconds, concurrently, like a GPU
server with free batch slots (its answer is a function of the prompt, so summaries are comparable).
`--engine URL` measures a real server instead (vLLM, llama.cpp's `llama-server --parallel N`, ...).

    python benchmarks/engine_parallel.py --latency 1.0 --paragraphs 40
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from arbor_cli.engine import connect  # noqa: E402
from arbor_cli.summarize import summarize  # noqa: E402
from long_document import long_document  # noqa: E402


def stand_in(latency: float) -> tuple[ThreadingHTTPServer, str, dict]:
    seen = {"requests": 0, "running": 0, "most": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send({"data": [{"id": "stand-in", "max_model_len": 4096}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["requests"] += 1
                seen["running"] += 1
                seen["most"] = max(seen["most"], seen["running"])
            time.sleep(latency)
            words = body["messages"][-1]["content"].split()
            text = "Notes: " + " ".join(words[len(words) // 2:len(words) // 2 + 30])
            with lock:
                seen["running"] -= 1
            self.send({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}", seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=None, help="a real server's URL (default: the stand-in)")
    parser.add_argument("--latency", type=float, default=1.0, help="the stand-in's seconds per request")
    parser.add_argument("--paragraphs", type=int, default=40, help="of tests/long_document.py, per topic")
    parser.add_argument("--parallel", default="1,2,4,8")
    args = parser.parse_args()
    text = long_document(args.paragraphs)
    url, seen = args.engine, None
    if url is None:
        _, url, seen = stand_in(args.latency)
    rows, first = [], None
    for n in [int(p) for p in args.parallel.split(",")]:
        model = connect(url, parallel=n)
        model._log = None  # measure the engine, not answers kept from the run before
        t0 = time.perf_counter()
        summary = summarize(model, text)
        seconds = time.perf_counter() - t0
        first = first or summary.text
        rows.append({"parallel": n, "seconds": round(seconds, 2), "parts": summary.chunks,
                     "same_summary_as_parallel_1": summary.text == first,
                     "most_at_once": seen["most"] if seen else None})
        if seen:
            seen["most"] = 0
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = round(base / row["seconds"], 2)
    json.dump({"engine": args.engine or f"stand-in, {args.latency} s a request, concurrent", "rows": rows},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
