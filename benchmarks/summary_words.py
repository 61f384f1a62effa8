"""How long `arbor summarize --words N` answers are, before and after the summary is held to N×1.25 words.

    python benchmarks/summary_words.py [--words 60 150] [FILE ...]   (default: three docs of this repository)

The default model is loaded once; each file is summarised at each --words as `arbor summarize FILE --words N`
does (summarize_documents), and the answer is recorded before and after summary_text.fit_words (one
generation gives both: fit_words only trims what the model wrote). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import arbor_cli
from arbor_cli import summarize as summarizer
from arbor_cli.summarize import SummaryOptions, summarize_documents
from arbor_cli.summary_text import count_words, fit_words, word_limit

ROOT = Path(__file__).resolve().parents[1]
FILES = ("docs/examples/eddystone.txt", "docs/mlx.md", "docs/architecture.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=[str(ROOT / f) for f in FILES])
    parser.add_argument("--words", type=int, nargs="+", default=[60, 150])
    parser.add_argument("--style", default="paragraph")
    args = parser.parse_args()
    model = arbor_cli.load(quiet=True)
    raw: list[str] = []

    def recording_fit(text: str, words: int) -> str:
        raw.append(text)
        return fit_words(text, words)

    summarizer.fit_words = recording_fit
    for path in args.files:
        text = Path(path).read_text(encoding="utf-8")
        for words in args.words:
            raw.clear()
            started = time.perf_counter()
            summary = summarize_documents(model, [(Path(path).name, text)], SummaryOptions.build(words, args.style))
            print(json.dumps({"file": Path(path).name, "words": words, "limit": word_limit(words),
                              "before": count_words(raw[-1]), "after": count_words(summary.text),
                              "seconds": round(time.perf_counter() - started, 1), "tokens": summary.documents[0]["tokens"],
                              "text_before": raw[-1], "text_after": summary.text}), flush=True)


if __name__ == "__main__":
    main()
