"""Real questions on real long documents through `arbor ask`: right, wrong with a quote, not found (issue 27).

Two documents, each with questions whose answers it states (and two it does not answer):
- Python's language reference (pydoc_data, 22 topics, ~10K tokens): the seven questions of
  docs/long-context.md, then two it does not answer;
- the GNU GPL version 3 (/usr/share/common-licenses/GPL-3 on Debian and Ubuntu; skipped where absent),
  ~8K tokens: seven questions chosen for it, then two it does not answer.
An answer is **right** when it is not "not found" and its first quote holds the fact (spacing aside); for a
question the document does not answer, when it says "not found". **Wrong with a quote**: an answer given
with a quote that does not hold the fact (the issue's goal: none). Prints a table and writes --json.

    python benchmarks/ask_real_questions.py --json out.json [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import arbor_cli
from arbor_cli.ask import NOT_FOUND, ask

REFERENCE_TOPICS = ["assert", "pass", "del", "return", "yield", "raise", "break", "continue", "import", "global",
                    "nonlocal", "if", "while", "for", "try", "with", "integers", "floating", "imaginary", "booleans",
                    "lambda", "truth"]
UNANSWERED = None  # the fact of a question the document does not answer
QUESTIONS = {
    "python-reference": [
        ('What is the "pass" statement?', "null operation"),
        ('What does the "continue" statement continue with?', "next cycle of the nearest enclosing loop"),
        ('What is the "global" statement?', "declaration which holds for the entire current code block"),
        ("What does an imaginary literal yield?", "complex number with a real part of 0.0"),
        ("What are lambda expressions used to create?", "anonymous functions"),
        ("Which values are interpreted as false in Boolean operations?", '"False", "None", numeric zero'),
        ("What happens if the name is unbound when it is deleted?", '"NameError" exception will be raised'),
        ("Which port does the built-in web server listen on?", UNANSWERED),
        ("Who designed the Python logo?", UNANSWERED),
    ],
    "gpl-3": [
        ('What does "The Program" refer to?', "any copyrightable work licensed under this License"),
        ("How is each licensee addressed?", 'addressed as "you"'),
        ('What is the "source code" for a work?', "preferred form of the work for making modifications"),
        ("For how long must a written offer of the Corresponding Source be valid?", "at least three years"),
        ("How many days after receipt of the notice may a violation be cured?", "30 days"),
        ("Is sublicensing allowed?", "Sublicensing is not allowed"),
        ('When is a compilation called an "aggregate"?', "not used to limit the access or legal rights"),
        ("What is the licence fee for commercial use?", UNANSWERED),
        ("Which court settles disputes over this License?", UNANSWERED),
    ],
}
GPL3 = "/usr/share/common-licenses/GPL-3"


def documents() -> dict[str, str]:
    from pydoc_data.topics import topics

    out = {"python-reference": "\n\n".join(topics[name].strip() for name in REFERENCE_TOPICS)}
    if os.path.isfile(GPL3):
        out["gpl-3"] = Path(GPL3).read_text(encoding="utf-8")
    return out


def judged(answer, fact: str | None) -> str:
    """"right", "wrong with a quote", "wrong" (no quote) or "not found"."""
    not_found = answer.text.startswith(NOT_FOUND)
    if fact is UNANSWERED:
        return "right" if not_found else ("wrong with a quote" if answer.findings else "wrong")
    if not_found:
        return "not found"
    quotes = [" ".join(f.quote.split()) for f in answer.findings if getattr(f, "answers", f.anchored)][:1]
    if not quotes:
        return "wrong"
    return "right" if " ".join(fact.split()) in quotes[0] else "wrong with a quote"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--documents", default=",".join(QUESTIONS))
    args = parser.parse_args()
    model = arbor_cli.load(args.model, device=args.device, quiet=True)
    rows = []
    for name, text in documents().items():
        if name not in args.documents.split(","):
            continue
        for question, fact in QUESTIONS[name]:
            t0 = time.perf_counter()
            answer = ask(model, text, question, keep=False)
            row = {"document": name, "question": question, "fact": fact, "verdict": judged(answer, fact),
                   "answer": answer.text, "path": answer.path, "parts": answer.parts,
                   "seconds": round(time.perf_counter() - t0, 2),
                   "findings": [{"part": f.part, "answer": f.answer, "quote": f.quote, "answers": getattr(f, "answers", f.anchored),
                                 "lacks": getattr(f, "lacks", []), "coverage": getattr(f, "coverage", None)}
                                for f in answer.findings][:6]}
            rows.append(row)
            print(f"{name}: {row['verdict']}: {question} -> {answer.text[:140]!r}", file=sys.stderr, flush=True)
    print("| document | right | wrong with a quote | wrong, no quote | not found |\n|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r["document"] for r in rows):
        mine = [r["verdict"] for r in rows if r["document"] == name]
        print(f"| {name} | {mine.count('right')}/{len(mine)} | {mine.count('wrong with a quote')} | "
              f"{mine.count('wrong')} | {mine.count('not found')} |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"model": model.checkpoint.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
