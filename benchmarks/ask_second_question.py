"""The second question about a long document: its time against the first's, and its answer against the
answer without any cache (issue 13; docs/long-context.md, "arbor ask").

The document is real prose (--prose FILE, e.g. build/long-context/kjv_pentateuch.txt) cut to --tokens,
with two facts hidden at 30% and 70% of it. In one process, on an empty document cache:
  1. the first question (the pass key): every part prefilled and kept on disk;
  2. the second question (the ship's name): every part loaded, only the question prefilled;
  3. the second question again without the cache (--no-cache's path): the reference answer.
Prints one JSON object: times, the ratio second / first, both answers and whether they are equal.

    python benchmarks/ask_second_question.py --prose build/long-context/kjv_pentateuch.txt --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import arbor_cli
from arbor_cli import doc_cache
from arbor_cli.ask import ask
from arbor_cli.evals import split_sentences

FACTS = [(0.3, "The pass key is 71423. Remember it."), (0.7, "The name of the ship is Endeavour.")]
FIRST, SECOND = "What is the pass key?", "What is the name of the ship?"


def document(sentences: list[str], tokens: int, tokenizer) -> str:
    """Sentences from the start of the text until `tokens`, the FACTS put in at their depths."""
    kept, count = [], 0
    for sentence in sentences:
        if count >= tokens:
            break
        kept.append(sentence)
        count += len(tokenizer.encode(" " + sentence))
    for depth, fact in sorted(FACTS, reverse=True):
        kept.insert(round(depth * len(kept)), fact)
    return " ".join(kept)


def timed_ask(model, text: str, question: str, keep: bool) -> dict:
    t0 = time.perf_counter()
    answer = ask(model, text, question, keep=keep)
    return {"seconds": round(time.perf_counter() - t0, 3), "text": answer.text, "path": answer.path,
            "parts": answer.parts, "tokens": answer.tokens, "cache": answer.cache, "timings": answer.timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prose", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    os.environ.setdefault("ARBOR_DOC_CACHE_MB", "8192")
    model = arbor_cli.load(args.model, device=args.device, quiet=True)
    with open(args.prose, encoding="utf-8") as f:
        text = document(split_sentences(f.read()), args.tokens, model.tokenizer)
    with tempfile.TemporaryDirectory() as home:  # an empty document cache; the model stays where it is
        doc_cache.directory = lambda: Path(home)
        model.generate("Hello", max_new_tokens=4)  # warm the backend (kernels, the compiled step) first
        first = timed_ask(model, text, FIRST, keep=True)
        second = timed_ask(model, text, SECOND, keep=True)
        uncached = timed_ask(model, text, SECOND, keep=False)
    report = {"model": model.checkpoint.name, "backend": model.backend, "device": model.device, "dtype": model.dtype,
              "quantize": model.lm.quantize, "document_tokens": first["tokens"], "first": first, "second": second,
              "second_without_cache": uncached, "second_over_first": round(second["seconds"] / first["seconds"], 4),
              "same_answer": second["text"] == uncached["text"]}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
