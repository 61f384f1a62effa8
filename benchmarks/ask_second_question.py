"""The second question about a long document: its time against the first's, and its answer against the
answer without any cache (issue 13; docs/long-context.md, "arbor ask").

The document is real prose (--prose FILE, e.g. build/long-context/kjv_pentateuch.txt) cut to --tokens,
with two facts hidden at 30% and 70% of it. In one process, on an empty document cache:
  1. the first question (the pass key): every part prefilled and kept on disk;
  2. the second question (the ship's name): every part loaded, only the question prefilled;
  3. the second question again without the cache (--no-cache's path): the reference answer.
Prints one JSON object: times, the ratio second / first, both answers and whether they are equal, and
per question the document's own share ("document": seconds spent prefilling its parts, saving them,
loading them from disk; loaded_over_prefilled: reading the cached document against prefilling it).

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
from arbor_cli.document_reader import DocumentReader
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


class DocumentClock:
    """Seconds spent on the document's parts: each part's reading (DocumentReader._document) split into
    loading from disk (doc_cache.load), holding it as kept (doc_cache.as_kept, where the code has it),
    saving (doc_cache.save) and the rest (prefilling it)."""

    def __init__(self):
        self.seconds = {"load_s": 0.0, "kept_s": 0.0, "save_s": 0.0, "part_s": 0.0}
        timed = [("load_s", doc_cache, "load"), ("kept_s", doc_cache, "as_kept"), ("save_s", doc_cache, "save"),
                 ("part_s", DocumentReader, "_document")]
        for name, owner, attr in timed:
            if hasattr(owner, attr):
                setattr(owner, attr, self._timed(name, getattr(owner, attr)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed

    def take(self) -> dict:
        s, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return {"load_s": round(s["load_s"], 3), "kept_s": round(s["kept_s"], 3), "save_s": round(s["save_s"], 3),
                "prefill_s": round(s["part_s"] - s["load_s"] - s["kept_s"] - s["save_s"], 3)}


def timed_ask(model, text: str, question: str, keep: bool, clock: DocumentClock) -> dict:
    t0 = time.perf_counter()
    answer = ask(model, text, question, keep=keep)
    return {"seconds": round(time.perf_counter() - t0, 3), "text": answer.text, "path": answer.path,
            "parts": answer.parts, "tokens": answer.tokens, "cache": answer.cache, "timings": answer.timings,
            "document": clock.take()}


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prose", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cold", action="store_true",
                        help="drop the kept entries from the page cache before the second question (as days later)")
    args = parser.parse_args()
    os.environ.setdefault("ARBOR_DOC_CACHE_MB", "8192")
    model = arbor_cli.load(args.model, device=args.device, quiet=True)
    with open(args.prose, encoding="utf-8") as f:
        text = document(split_sentences(f.read()), args.tokens, model.tokenizer)
    with tempfile.TemporaryDirectory() as home:  # an empty document cache; the model stays where it is
        doc_cache.directory = lambda: Path(home)
        model.generate("Hello", max_new_tokens=4)  # warm the backend (kernels, the compiled step) first
        clock = DocumentClock()
        first = timed_ask(model, text, FIRST, keep=True, clock=clock)
        if args.cold:
            for path in Path(home).iterdir():
                drop_from_page_cache(path)
        second = timed_ask(model, text, SECOND, keep=True, clock=clock)
        uncached = timed_ask(model, text, SECOND, keep=False, clock=clock)
        kept = sum(p.stat().st_size for p in Path(home).iterdir())
    report = {"model": model.checkpoint.name, "backend": model.backend, "device": model.device, "dtype": model.dtype,
              "quantize": model.lm.quantize, "document_tokens": first["tokens"], "first": first, "second": second,
              "second_without_cache": uncached, "second_over_first": round(second["seconds"] / first["seconds"], 4),
              "loaded_over_prefilled": round(second["document"]["load_s"] / first["document"]["prefill_s"], 4),
              "kept_bytes": kept, "cold": args.cold, "same_answer": second["text"] == uncached["text"],
              "load_average": os.getloadavg()}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
