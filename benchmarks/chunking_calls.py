"""Tokenizer calls and split time of one `arbor summarize` run, with generation stubbed out.

    python benchmarks/chunking_calls.py [--context 4096] [--repeat 5] [--dump chunks.json]

The real default model's tokenizer; the model's chat encodes its prompt (as Model.chat does) and
returns a fixed short note instead of generating. Reported: the calls to encode, encode_chat and
encode_with_offsets over the whole run (the document is tests/long_document.py's, ~34K tokens),
and the run's split_s (the fastest of --repeat runs: the machine may be busy); then split_s for
a line of 100,000 characters without whitespace (random letters and digits), the worst case for
cutting inside words. --dump writes the map phase's chunk lists (start, end, tokens, overlap) for
that document and README.md at a 4096- and a 1024-token context, to compare two versions of the
code. Runs on the code before SummaryRun too:
`PYTHONPATH=<old tree>:<old tree>/core:<old tree>/backends:<old tree>/weights python benchmarks/chunking_calls.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import arbor_weights
from arbor_cli import summarize as summarizer
from arbor_cli.chunking import document_token_offsets
from arbor_cli.generate import GenerationResult
from arbor_cli.progress import NoProgress
from arbor_cli.summarize import SummaryOptions, summarize
from arbor_core.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from long_document import long_document  # noqa: E402

NOTE = "Bees make honey. Volcanoes erupt."
COUNTED = ("encode", "encode_chat", "encode_with_offsets")


class CountingTokenizer:
    """The real tokenizer, counting the calls that tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, Counter()

    def __getattr__(self, name):
        attribute = getattr(self._tokenizer, name)
        if name not in COUNTED:
            return attribute

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attribute(*args, **kwargs)
        return counted


class StubModel:
    """What the summariser asks of a Model, with a fixed note in place of generation."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context

    def notify(self, message: str) -> None:
        print(message, file=sys.stderr)

    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None):
        return SimpleNamespace(context=requested or self.context, needed_tokens=needed_tokens)

    def rope_scaling_for(self, context: int, rope: str | None = None):
        return None

    def chat(self, messages, stream=False, *, context=None, rope=None, **options):
        prompt_tokens = len(self.tokenizer.encode_chat(messages, add_generation_prompt=True))
        return GenerationResult(NOTE, [0] * 8, "eos", {"prompt_tokens": prompt_tokens, "generated_tokens": 8},
                                context or self.context)


def map_chunks(tokenizer, text: str, context: int) -> list[list[int]]:
    """The chunks the map phase reads at `context`, as [start, end, tokens, overlap]."""
    model = StubModel(tokenizer, context)
    progress = NoProgress()
    run = summarizer.SummaryRun(model, context, SummaryOptions(), progress)
    chunks = run.split(text, document_token_offsets(tokenizer.encode_with_offsets, text, progress))
    return [[c.start, c.end, c.tokens, c.overlap] for c in chunks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dump", type=Path, help="write the chunk lists here as JSON")
    args = parser.parse_args()
    real = load_tokenizer(arbor_weights.resolve(arbor_weights.DEFAULT_MODEL, quiet=True).path)
    text = long_document()
    split_s = []
    for _ in range(args.repeat):
        tokenizer = CountingTokenizer(real)
        summary = summarize(StubModel(tokenizer, args.context), text, SummaryOptions())
        split_s.append(summary.timings["split_s"])
    print(json.dumps({"document_tokens": len(real.encode(text)), "context": args.context, "chunks": summary.chunks,
                      "tokenizer_calls": dict(tokenizer.calls), "total_calls": sum(tokenizer.calls.values()),
                      "split_s": min(split_s)}))
    line = "".join(random.Random(0).choices(string.ascii_letters + string.digits, k=100_000))
    summary = summarize(StubModel(real, args.context), line, SummaryOptions())
    print(json.dumps({"document": "100K-character line", "chunks": summary.chunks, "split_s": summary.timings["split_s"]}))
    if args.dump:
        documents = {"long_document": text, "README.md": (REPO / "README.md").read_text(encoding="utf-8")}
        lists = {f"{name}@{context}": map_chunks(real, body, context)
                 for name, body in documents.items() for context in (4096, 1024)}
        args.dump.write_text(json.dumps(lists) + "\n")


if __name__ == "__main__":
    main()
