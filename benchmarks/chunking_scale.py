"""How splitting a document for `arbor summarize` scales with its size, and how soon a big one shows progress.

For each size (characters), a document with whitespace (tests/long_document.py's prose, repeated) and
one without (random letters, one endless "word"): the time to tokenize it in blocks (the one
tokenization a summary makes) and to cut it into parts for a 4096-token context, with the default
model's tokenizer. Then, for the largest document with whitespace, the time from the text being read
to the first progress update of a real `arbor summarize` run (model load included, as the CLI does
it), and the split phase's share of the whole run, the whole run estimated from parts actually
summarised (`--parts N` of them, timed) times the number of parts.

    python benchmarks/chunking_scale.py                      # 100K .. 50M characters
    python benchmarks/chunking_scale.py --sizes 100k,1m --parts 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from long_document import long_document  # noqa: E402

import arbor_cli  # noqa: E402
from arbor_cli.chunking import tokenize_in_blocks  # noqa: E402
from arbor_cli.summarize import SummaryOptions, SummaryRun, map_messages  # noqa: E402
from arbor_core.planner import parse_token_counts  # noqa: E402


def documents(size: int) -> dict[str, str]:
    prose = long_document()
    rng = random.Random(0)
    return {"whitespace": (prose * (size // len(prose) + 1))[:size],
            "no whitespace": "".join(rng.choices(string.ascii_lowercase, k=size))}


class Stop(Exception):
    pass


class FirstProgress:
    """Records when each phase begins; stops the run once the parts are known (map phase begins)."""

    def __init__(self, t0: float):
        self.t0, self.events = t0, []

    def begin(self, phase: str, total: int) -> None:
        self.events.append((phase, total, time.perf_counter() - self.t0))
        if phase.startswith("reading") and phase.endswith("parts"):
            raise Stop

    def advance(self) -> None:
        pass


def split_times(model, text: str, context: int) -> dict:
    t0 = time.perf_counter()
    offsets = tokenize_in_blocks(model.tokenizer.encode_with_offsets, text)
    t1 = time.perf_counter()
    run = SummaryRun(model, context, SummaryOptions(), FirstProgress(t1))
    chunks = run.split(text, offsets)
    t2 = time.perf_counter()
    return {"characters": len(text), "tokens": len(offsets), "parts": len(chunks),
            "tokenize_s": round(t1 - t0, 3), "split_s": round(t2 - t1, 3), "chunks": chunks}


def first_progress(path: Path, context: int) -> dict:
    """A summarize run as the CLI makes it: read, load the model, tokenize, split; timed from the read."""
    from arbor_cli.cli.common import read_text_input
    from arbor_cli.summarize import summarize

    text, _ = read_text_input(str(path))
    t_read = time.perf_counter()
    model = arbor_cli.load(context=context, quiet=True)
    loaded = time.perf_counter() - t_read
    progress = FirstProgress(t_read)
    try:
        summarize(model, text, progress=progress)
    except Stop:
        pass
    return {"model_load_s": round(loaded, 3), "events": progress.events}


def seconds_per_part(model, text: str, chunks, context: int, parts: int) -> float:
    run = SummaryRun(model, context, SummaryOptions(), FirstProgress(0.0))
    t0 = time.perf_counter()
    for i, chunk in enumerate(chunks[:parts], 1):
        run.generate(map_messages(chunk.text_of(text), i, len(chunks), run.options), run.options.note_tokens)
    return (time.perf_counter() - t0) / parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100k,1m,10m,50m", help="characters; k = 1,000, m = 1,000,000")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--parts", type=int, default=2, help="parts of the largest document summarised to time a part")
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [int(float(s[:-1]) * {"k": 1e3, "m": 1e6}[s[-1]]) if s[-1] in "km" else int(s)
             for s in args.sizes.lower().split(",")]
    parse_token_counts(str(args.context), "--context")
    model = arbor_cli.load(context=args.context, quiet=True)
    rows, largest = [], None
    print(f"{'characters':>12} {'kind':>14} {'tokens':>11} {'parts':>7} {'tokenize s':>11} {'split s':>9}")
    for size in sizes:
        for kind, text in documents(size).items():
            row = split_times(model, text, args.context)
            chunks = row.pop("chunks")
            rows.append({"kind": kind, **row})
            print(f"{size:>12,} {kind:>14} {row['tokens']:>11,} {row['parts']:>7,} {row['tokenize_s']:>11.2f} "
                  f"{row['split_s']:>9.2f}", flush=True)
            if kind == "whitespace" and size == max(sizes):
                largest = (text, chunks, row)
    text, chunks, row = largest
    out = {"rows": rows}
    path = Path("/tmp/arbor_chunking_scale.txt")
    path.write_text(text)
    progress = first_progress(path, args.context)
    out["first_progress"] = progress
    first = progress["events"][0]
    print(f"\n{len(text):,} characters: model load {progress['model_load_s']:.2f} s; first progress "
          f"({first[0]!r}) {first[2]:.2f} s after the text was read; phases: "
          + ", ".join(f"{p} at {t:.1f} s" for p, _, t in progress["events"]))
    if args.parts:
        per_part = seconds_per_part(model, text, chunks, args.context, args.parts)
        whole = row["tokenize_s"] + row["split_s"] + per_part * len(chunks)
        out["seconds_per_part"], out["whole_run_estimate_s"] = round(per_part, 2), round(whole)
        share = (row["tokenize_s"] + row["split_s"]) / whole
        out["split_phase_share"] = round(share, 5)
        print(f"a part takes {per_part:.1f} s; whole run ≈ {whole / 3600:.1f} h for {len(chunks):,} parts; "
              f"tokenize + split = {share:.3%} of it")
    path.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
