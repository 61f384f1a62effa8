"""Does the model's own judgement tell a quote that answers from one that does not, beyond the terms rule?
(issue 27: "the log-probability of the question after the quote alone against a neutral baseline").

Reads the JSON of benchmarks/ruler_run.py and benchmarks/ask_real_questions.py, labels every finding they
list (right: its quote holds the asked key's value, or the question's fact; wrong: it holds another key's
value, or the question has no answer in the document, or the quote lacks the fact), and scores each quote:

    lift = mean log p(question | "Text: <quote>") - mean log p(question | "Text: <neutral>")   (nats a token)

over the question's tokens but the first, in ask's own prompt (arbor_cli.document_reader.QuoteJudge). Prints, for findings the terms rule kept
and for those it rejected, the lifts of right and wrong ones, and how many a threshold would keep.

    python benchmarks/ask_quote_check.py /tmp/dev.json /tmp/real.json [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics

import arbor_cli
from arbor_cli.document_reader import QuoteJudge


def labelled(paths: list[str]):
    """(question, quote, kept by the rule, right) for every finding of the runs' JSON."""
    for path in paths:
        for row in json.load(open(path))["rows"]:
            for f in row.get("findings", []):
                if not f.get("quote"):
                    continue
                quote = " ".join(f["quote"].split())
                if "fact" in row:  # ask_real_questions.py
                    right = row["fact"] is not None and " ".join(row["fact"].split()) in quote
                elif row["task"] in ("count", "passkey"):
                    continue
                else:
                    right = any(v in quote for v in row["expected"]) and not any(v in quote for v in row.get("others", []))
                yield row["question"], quote, bool(f["answers"]), right


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    model = arbor_cli.load(args.model, quiet=True)
    judges: dict[str, QuoteJudge] = {}
    rows = []
    for question, quote, kept, right in dict.fromkeys(labelled(args.runs)):
        lift = judges.setdefault(question, QuoteJudge(model, question)).lift(quote)
        rows.append((kept, right, lift))
        print(f"{'kept' if kept else 'rejected'} {'right' if right else 'WRONG'} {lift:+.2f} {question[:60]!r} "
              f"{quote[:90]!r}", flush=True)
    for kept in (True, False):
        for right in (True, False):
            lifts = sorted(lift for k, r, lift in rows if k is kept and r is right)
            if lifts:
                print(f"{'kept' if kept else 'rejected'} by the rule, {'right' if right else 'wrong'}: {len(lifts)}, "
                      f"lift median {statistics.median(lifts):+.2f}, range {lifts[0]:+.2f}..{lifts[-1]:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
