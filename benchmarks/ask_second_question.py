"""The second question about a long document: its time against the first's, and its answer against the
answer without any cache (issue 13; docs/long-context.md, "arbor ask").

The document is real prose (--prose FILE, e.g. build/long-context/kjv_pentateuch.txt) cut to --tokens,
with two facts hidden at 30% and 70% of it. `arbor ask` reads only the parts naming what is asked. In one
process, on an empty document cache:
  1. the pass key asked: the part(s) naming it prefilled and kept on disk;
  2. the ship's name asked, the first time: its part(s) prefilled and kept;
  3. the ship's name asked again (--cold: its entries dropped from the page cache first): loaded from disk,
     only the question prefilled;
  4. the ship's name without the cache (--no-cache's path): the reference answer;
  5. every part read with the question after it, nothing kept: what the first question cost before ask read
     only the naming parts (and what a cache of the whole document saves).
Prints one JSON object: times, the ratios cached / first (3 / 2) and cached / the whole reading (3 / 5),
both answers and whether they are equal, and per question the document's own share ("document": seconds
spent prefilling its parts, saving them, loading them from disk; loaded_over_prefilled: reading the cached
parts against prefilling them).
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
from arbor_cli.ask import ask, reliable_tokens
from arbor_cli.document_index import cut_into_parts
from arbor_cli.chunking import document_token_offsets
from arbor_cli.document_reader import DocumentReader
from arbor_cli.evals import split_sentences
from arbor_cli.progress import NoProgress

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
    """Seconds spent on the document's parts: each part's reading (DocumentReader.session_for) split into
    loading from disk (doc_cache.load), holding it as kept (doc_cache.as_kept, where the code has it),
    saving (doc_cache.save) and the rest (prefilling it)."""

    def __init__(self):
        self.seconds = {"load_s": 0.0, "kept_s": 0.0, "save_s": 0.0, "part_s": 0.0}
        timed = [("load_s", doc_cache, "load"), ("kept_s", doc_cache, "as_kept"), ("save_s", doc_cache, "save"),
                 ("part_s", DocumentReader, "session_for")]
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
            "parts": answer.parts, "read": answer.read, "tokens": answer.tokens, "cache": answer.cache, "timings": answer.timings,
            "document": clock.take()}


def whole_reading(model, text: str, question: str) -> dict:
    """Every part of `text` read with `question` after it and scored, nothing kept: the first question's
    reading before ask read only the parts naming what is asked."""
    offsets = document_token_offsets(model.tokenizer.encode_with_offsets, text, NoProgress())
    parts = [body for _, body in cut_into_parts(model.tokenizer, text, offsets, reliable_tokens(model))]
    t0 = time.perf_counter()
    for _ in DocumentReader(model, keep=False).read_all(parts, question):
        pass
    return {"seconds": round(time.perf_counter() - t0, 3), "parts": len(parts)}


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
        second = timed_ask(model, text, SECOND, keep=True, clock=clock)
        if args.cold:
            for path in Path(home).iterdir():
                drop_from_page_cache(path)
        cached = timed_ask(model, text, SECOND, keep=True, clock=clock)
        uncached = timed_ask(model, text, SECOND, keep=False, clock=clock)
        kept = sum(p.stat().st_size for p in Path(home).iterdir())
        whole = whole_reading(model, text, SECOND)
    report = {"model": model.checkpoint.name, "backend": model.backend, "device": model.device, "dtype": model.dtype,
              "quantize": model.lm.quantize, "document_tokens": first["tokens"], "first": first, "second": second,
              "second_cached": cached, "second_without_cache": uncached, "whole_reading": whole,
              "cached_over_first": round(cached["seconds"] / second["seconds"], 4),
              "cached_over_whole_reading": round(cached["seconds"] / whole["seconds"], 4),
              "loaded_over_prefilled": round(cached["document"]["load_s"] / second["document"]["prefill_s"], 4),
              "kept_bytes": kept, "cold": args.cold, "same_answer": cached["text"] == uncached["text"],
              "load_average": os.getloadavg()}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
