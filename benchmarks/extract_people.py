"""Issue 29's extraction-quality figure: `arbor extract` on a long real-text document with planted records.

A --tokens-long document (default 64K) of real prose (--prose FILE, e.g. build/long-context/kjv_pentateuch.txt)
gets 30 people planted at random depths, each appointed to a role in a year ("In 1911, Mara Quill was appointed
treasurer of the Harbour Board."), in three phrasings, plus look-alike distractor sentences that hold a name, a
role and a year but appoint no one ("In 1920, Ivo Marsh applied to be warden of the Mill Trust, but the post went
to another.") and sentences with a name and a year alone ("Edda Pell was born in 1877."). `arbor extract` reads
it with the item schema {name, role, year} and the instruction to list every person appointed to a role.

Scored against the planted truth: recall (planted people found with their role and year), precision (kept items
that are planted people with their role and year), and for every kept item whether its span (`_source` start/end)
holds the sentence it came from. Prints one JSON object.

    python benchmarks/extract_people.py --prose build/long-context/kjv_pentateuch.txt [--model M] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import arbor_cli
from arbor_cli.documents import Document
from arbor_cli.evals import split_sentences
from arbor_cli.extract_records import extract_records

FIRST = ["Mara", "Ivo", "Edda", "Silas", "Wren", "Abel", "Hedda", "Jonah", "Rosa", "Oskar", "Leona", "Tobias",
         "Vera", "Anselm", "Greta", "Milo", "Ines", "Casimir", "Thea", "Rufus", "Lotte", "Emeric", "Sabine", "Orrin"]
LAST = ["Quill", "Marsh", "Pell", "Crane", "Hale", "Stroud", "Lowe", "Pike", "Varga", "Sorensen", "Lindqvist",
        "Fenwick", "Holm", "Brandt", "Okafor", "Duval", "Marchetti", "Novak", "Achterberg", "Ferreira", "Kowalski"]
ROLES = ["treasurer", "secretary", "warden", "chairman", "librarian", "surveyor", "harbourmaster", "registrar",
         "archivist", "steward", "auditor", "bursar"]
ORGS = ["Harbour Board", "Mill Trust", "County Library", "Canal Company", "Guild of Masons", "Parish Council",
        "Lighthouse Society", "Weavers' Hall", "Botanical Garden", "Grammar School"]
PLANTED = ["In {year}, {name} was appointed {role} of the {org}.",
           "{name} became {role} of the {org} in {year}.",
           "The {org} named {name} as its {role} in {year}."]
LOOK_ALIKE = ["In {year}, {name} applied to be {role} of the {org}, but the post went to another.",
              "{name} was born in {year}."]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"},
                                           "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
          "required": ["name", "role", "year"], "additionalProperties": False}
INSTRUCTION = "Every person appointed to a role: the person's full name, the role, and the year of the appointment."


def build(prose: str, tokens: int, count_tokens, people: int, distractors: int, seed: int):
    rng = random.Random(seed)
    sentences, kept, n = split_sentences(prose), [], 0
    for sentence in sentences:
        if n >= tokens:
            break
        kept.append(sentence)
        n += count_tokens(" " + sentence)
    names = rng.sample([f"{first} {last}" for first in FIRST for last in LAST], people + distractors)
    truth, planted = [], []
    for name in names[:people]:
        record = {"name": name, "role": rng.choice(ROLES), "year": rng.randint(1850, 1990)}
        truth.append(record)
        planted.append(rng.choice(PLANTED).format(org=rng.choice(ORGS), **record))
    for name in names[people:]:
        planted.append(rng.choice(LOOK_ALIKE).format(name=name, role=rng.choice(ROLES), org=rng.choice(ORGS),
                                                     year=rng.randint(1850, 1990)))
    paragraphs = [" ".join(kept[i:i + 8]) for i in range(0, len(kept), 8)]
    for sentence in planted:
        paragraphs.insert(rng.randint(0, len(paragraphs)), sentence)
    return "\n\n".join(paragraphs), truth, planted[:people]


def role_of(value: str) -> str:
    words = [w for w in str(value).casefold().replace(".", " ").split() if w not in ("the", "of", "its", "as")]
    return next((w for w in words if w in ROLES), " ".join(words))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prose", required=True)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--distractors", type=int, default=15)
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model = arbor_cli.load(args.model, device=args.device, quiet=True)
    with open(args.prose, encoding="utf-8") as f:
        text, truth, sentences = build(f.read(), args.tokens, lambda s: len(model.tokenizer.encode(s)), args.people,
                                       args.distractors, args.seed)
    t0 = time.perf_counter()
    result = extract_records(model, [Document("people.txt", text)], json.dumps(SCHEMA), instruction=INSTRUCTION,
                             keep=False)
    seconds = time.perf_counter() - t0
    wanted = {(t["name"].casefold(), t["role"], t["year"]): s for t, s in zip(truth, sentences)}
    found, right, spans_ok, rows = set(), 0, 0, []
    for item in result.items:
        key = (str(item.get("name", "")).casefold().strip(), role_of(item.get("role", "")), item.get("year"))
        span = text[item["_source"]["start"]:item["_source"]["end"]]
        ok = key in wanted
        right += ok
        if ok:
            found.add(key)
            spans_ok += wanted[key] in span or span in wanted[key]
        rows.append({"item": {k: v for k, v in item.items() if k != "_source"}, "right": ok, "span": span[:200]})
    report = {"model": model.checkpoint.name, "device": model.device, "dtype": model.dtype,
              "quantize": getattr(model.lm, "quantize", None), "tokens": len(model.tokenizer.encode(text)),
              "people": args.people, "distractors": args.distractors, "kept": len(result.items),
              "dropped": getattr(result, "dropped", None), "recall": round(len(found) / len(wanted), 4),
              "precision": round(right / len(result.items), 4) if result.items else None,
              "spans_holding_their_sentence": f"{spans_ok}/{right}", "seconds": round(seconds, 1), "items": rows}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
