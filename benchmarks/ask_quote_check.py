"""Does the model's own judgement tell a quote that answers from one that does not, beyond the terms rule?
(issue 27: "the log-probability of the question after the quote alone against a neutral baseline").

Each quote is scored by arbor_cli.document_reader.QuoteJudge:

    lift = mean log p(question | "Text: <quote>") - mean log p(question | "Text: <neutral>")   (nats a token)

over the question's tokens but the first, in ask's own prompt. Two ways to choose the quotes:
- RUN.json ...: the findings listed by benchmarks/ruler_run.py and benchmarks/ask_real_questions.py runs,
  kept or rejected by the terms rule (right: the quote holds the asked key's value, or the question's
  fact; wrong otherwise);
- --candidates dev|held-out|real: every sentence ask_every_part would let the model judge (it carries the
  question's terms and a value the question lacks), in the RULER-style tasks at 2K (3 trials) or in the
  real documents of ask_real_questions.py (right: it holds the task's value, is a planted record, or holds
  the question's fact).
Prints each quote's lift and, for right and wrong ones (and kept or rejected), their count, median, range.

    python benchmarks/ask_quote_check.py /tmp/dev.json /tmp/real.json [--model NAME]
    python benchmarks/ask_quote_check.py --candidates real
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ask_real_questions import QUESTIONS, documents  # noqa: E402
from ruler_tasks import Generator  # noqa: E402

import arbor_cli  # noqa: E402
from arbor_cli.ask_every_part import SHAPE_CHARS  # noqa: E402
from arbor_cli.document_reader import QuoteJudge  # noqa: E402
from arbor_cli.question_terms import QuestionTerms, SentenceCounts, answer_values, sentences_of  # noqa: E402


def from_runs(paths: list[str]):
    """(question, quote, kept by the rule, right) for every finding of the runs' JSON."""
    for path in paths:
        for row in json.load(open(path))["rows"]:
            for f in row.get("findings", []):
                if not f.get("quote") or row.get("task") in ("count", "passkey"):
                    continue
                quote = " ".join(f["quote"].split())
                if "fact" in row:  # ask_real_questions.py
                    right = row["fact"] is not None and " ".join(row["fact"].split()) in quote
                else:
                    right = any(v in quote for v in row["expected"]) and not any(v in quote for v in row["others"])
                yield row["question"], quote, bool(f["answers"]), right


def judged_sentences(text: str, question: str):
    """The sentences ask_every_part.judged would weigh for `question`."""
    terms = QuestionTerms(question, SentenceCounts(text))
    for lo, hi in sentences_of(text):
        sentence = " ".join(text[lo:hi].split())
        if len(sentence) <= SHAPE_CHARS and answer_values(sentence, terms.question_words) \
                and terms.support(sentence).anchored:
            yield sentence


def candidates(which: str, model):
    """(question, quote, True, right) for every sentence the model would judge (see the docstring)."""
    if which == "real":
        for name, text in documents().items():
            for question, fact in QUESTIONS[name]:
                for sentence in judged_sentences(text, question):
                    yield question, sentence, True, fact is not None and " ".join(fact.split()) in sentence
        return
    generator = Generator(which, 2048, lambda s: len(model.tokenizer.encode(s)))
    for kind in ("one-key", "multi-value", "count", "absent"):
        for trial in range(3):
            task = generator.task(kind, trial, 3)
            for sentence in judged_sentences(task.text, task.question):
                record = kind == "count" and sentence.split(":")[0] in ("Ledger entry", "Visitor log")
                yield task.question, sentence, True, record or any(v in sentence for v in task.expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--candidates", choices=("dev", "held-out", "real"), default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    model = arbor_cli.load(args.model, quiet=True)
    quotes = candidates(args.candidates, model) if args.candidates else from_runs(args.runs)
    judges: dict[str, QuoteJudge] = {}
    rows = []
    for question, quote, kept, right in dict.fromkeys(quotes):
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
