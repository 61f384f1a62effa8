"""Runs benchmarks/ruler_tasks.py's tasks through `arbor ask` and prints the issue's table; writes JSON.

    python benchmarks/ruler_run.py --set held-out --lengths 16k,32k --trials 8 --json out.json
    python benchmarks/ruler_run.py --set dev --lengths 2k --trials 2 --tasks one-key,absent   # a quick check

Nothing is kept on disk (each question reads its document afresh). Per task and length: right (the issue's
"right": the value / "not found" / every value / the exact count), other (another key's value in the
answer), not found, values found (multi-value), seconds per question (median). --model names any model
arbor loads (default: the default model); --device and --dtype as for arbor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler_tasks import SETS, TASKS, Generator, score  # noqa: E402

import arbor_cli  # noqa: E402
from arbor_cli.ask import ask  # noqa: E402
from arbor_core.planner import parse_token_counts  # noqa: E402


def run_task(model, generator: Generator, kind: str, trials: int, on_row) -> list[dict]:
    rows = []
    for trial in range(trials):
        task = generator.task(kind, trial, trials)
        t0 = time.perf_counter()
        answer = ask(model, task.text, task.question, keep=False)
        row = {"task": kind, "set": task.set, "tokens": generator.tokens, "trial": trial, "depth": task.depth,
               "question": task.question, "expected": task.expected, "others": task.others, "key": task.key,
               "answer": answer.text, "path": answer.path,
               "parts": answer.parts, "read": answer.read, "seconds": round(time.perf_counter() - t0, 2),
               "findings": [{"part": f.part, "answer": f.answer, "quote": f.quote, "answers": f.answers,
                             "lacks": f.lacks} for f in answer.findings][:8],
               **score(task, answer.text)}
        rows.append(row)
        on_row(row)
    return rows


def report_row(row: dict, rows_path: str | None) -> None:
    print(f"{row['task']} {row['tokens']} #{row['trial']}: {'right' if row['right'] else 'WRONG'} "
          f"({row['seconds']} s) {row['answer'][:160]!r}", file=sys.stderr, flush=True)
    if rows_path:
        with open(rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    out = {"trials": n, "right": sum(r["right"] for r in rows) / n, "other": sum(r["other"] for r in rows) / n,
           "not_found": sum(r["not_found"] for r in rows) / n,
           "seconds": statistics.median(r["seconds"] for r in rows)}
    if rows[0]["task"] == "multi-value":
        out["values_found"] = sum(r["found"] for r in rows) / max(sum(r["values"] for r in rows), 1)
        out["values_wrong"] = sum(r["wrong"] for r in rows)
    return out


def table(results: dict) -> str:
    lines = ["| task | tokens | right | other key's value | not found | values found | s / question |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (kind, tokens), s in results.items():
        values = f"{s['values_found']:.0%} ({s['values_wrong']} wrong)" if "values_found" in s else ""
        lines.append(f"| {kind} | {tokens} | {s['right']:.0%} | {s['other']:.0%} | {s['not_found']:.0%} | {values} | "
                     f"{s['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=SETS, default="held-out")
    parser.add_argument("--lengths", default="4k")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--rows", default=None, help="also append each row to this JSON-lines file as it is "
                        "scored (a run stopped at a time limit keeps what it did)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    if unknown := [k for k in kinds if k not in TASKS]:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    model = arbor_cli.load(args.model, device=args.device, dtype=args.dtype, quiet=True)
    results, rows = {}, []
    for tokens in parse_token_counts(args.lengths, "--lengths"):
        generator = Generator(args.set, tokens, lambda s: len(model.tokenizer.encode(s)))
        for kind in kinds:
            done = run_task(model, generator, kind, args.trials, lambda r: report_row(r, args.rows))
            rows += done
            results[(kind, tokens)] = summary(done)
    print(table(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "model": model.checkpoint.name, "backend": model.backend, "device": model.device, "set": args.set,
            "trials": args.trials, "summary": [{"task": k, "tokens": t, **s} for (k, t), s in results.items()],
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
