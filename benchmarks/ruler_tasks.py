"""RULER-style tasks for `arbor ask` (after Hsieh et al., 2024), made here: haystacks of real text, planted
key/value sentences, questions, and the scoring the issue states (issue 27, docs/long-context.md).

Two sets, kept apart: **dev** (what the evidence rules were developed on) and **held-out** (what they are
judged on; nothing in it was looked at while the rules were written):

| | haystack | keys | needle sentences and questions | values |
|---|---|---|---|---|
| dev | Python's language reference (pydoc_data, in every CPython) | word pairs ("amber-falcon") | access codes, lockers; ledger entries | 7-digit numbers |
| held-out | licence texts (/usr/share/common-licenses, else the installed packages' LICENSE files) | people's names ("Ilse Varga"), word pairs | the issue's "special magic numbers", register serials; visitor log entries | codes like "XK-48213" |

Tasks (each at a token length, `trials` times, planted at depths (i + 0.5) / trials):
- `one-key`: the asked key among 4-6 distractor keys, one value each; right = its value in the answer,
  other = another key's value in it;
- `absent`: 3-5 keys present, another asked; right = "not found", other = a present key's value in it;
- `multi-value`: 2-4 values of the asked key spread over the document, 3 distractor keys, asked for all;
  found = the share of its values in the answer, other = a distractor's value in it;
- `count`: 5-20 planted records, "how many"; right = the answer's first number is their count;
- `passkey`: today's single pass key ("What is the pass key?"); right = the key in the answer.
"""

from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass, field

NOT_FOUND = "The document does not seem to say."  # arbor_cli.ask.NOT_FOUND, repeated: this file imports no arbor
TASKS = ("one-key", "absent", "multi-value", "count", "passkey")
SETS = ("dev", "held-out")

ADJECTIVES = ("amber cobalt velvet silent hollow crimson gentle rapid frozen golden bitter quiet copper woolen "
              "scarlet narrow ancient brisk dusty lunar").split()
NOUNS = ("falcon heron thistle willow orchid lantern harbor meadow anchor compass ember glacier otter raven "
         "saddle spindle tundra walnut quarry beacon").split()
FIRST_NAMES = "Ilse Tomas Marit Oskar Leona Bruno Greta Anselm Vera Kasimir Nadia Emil Rosa Viktor Edda Linus".split()
LAST_NAMES = "Varga Brandt Holm Quist Marek Falk Sorensen Lindqvist Havel Rusk Ostrow Kell Dunmore Pell".split()
PAYERS = "Mara Quill,Jonah Pike,Ada Fenwick,Silas Crane,Ivo Marsh,Hedda Lowe,Abel Stroud,Wren Hale".split(",")


@dataclass(frozen=True)
class Format:
    """One way of planting a key's values and asking for them."""

    needle: str  # "{key}" and "{value}"
    single: tuple[str, ...]  # questions for one value of "{key}"
    every: tuple[str, ...]  # questions for all of "{key}"'s values


@dataclass(frozen=True)
class Records:
    """Planted records to count."""

    record: str  # "{name}" and "{value}"
    questions: tuple[str, ...]


FORMATS = {
    "dev": (Format("The access code for {key} is {value}.",
                   ("What is the access code for {key}?", "Which access code does the text give for {key}?"),
                   ("What are all the access codes for {key}?", "List every access code given for {key}.")),
            Format("Note that {key} keeps locker number {value}.",
                   ("What locker number does {key} keep?", "Which locker does {key} keep?"),
                   ("List every locker number that {key} keeps.", "What are all the locker numbers {key} keeps?"))),
    "held-out": (Format("One of the special magic numbers for {key} is: {value}.",
                        ("What is the special magic number for {key} mentioned in the provided text?",),
                        ("What are all the special magic numbers for {key} mentioned in the provided text?",)),
                 Format("In the register, the serial of {key} reads {value}.",
                        ("What serial does the register give for {key}?", "Tell me the serial of {key}."),
                        ("Which serials does the register list for {key}?", "Give every serial recorded for {key}."))),
}
RECORDS = {
    "dev": Records("Ledger entry: {name} paid {value} shillings.",
                   ("How many ledger entries are there?", "How many ledger entries does the text contain?")),
    "held-out": Records("Visitor log: {name} signed in at gate {value}.",
                        ("How many visitor log entries does the document hold?",
                         "How many times did someone sign in according to the visitor log?")),
}
PASSKEY = "The pass key is {value}. Remember it. {value} is the pass key."


@dataclass
class Task:
    kind: str
    set: str
    trial: int
    depth: float
    text: str
    question: str
    expected: list[str]  # values the answer must hold (count: the count, as text; absent: none)
    others: list[str] = field(default_factory=list)  # other keys' values: never in a right answer
    key: str = ""


def haystack_text(which: str) -> str:
    """The real text a set hides its needles in (see the module docstring)."""
    if which == "dev":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name].strip() for name in sorted(topics))
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    if not paths:
        import site

        paths = sorted({p for d in site.getsitepackages() for p in glob.glob(f"{d}/*.dist-info/**/LICEN[CS]E*",
                                                                             recursive=True)})
    texts, seen = [], set()
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            text = open(path, encoding="utf-8", errors="replace").read().strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
    return "\n\n".join(texts)


SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    """The haystack as sentences; a paragraph's end stays as a blank line at the end of its last sentence."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        pieces = [" ".join(p.split()) for p in SENTENCE.split(paragraph.strip()) if p.strip()]
        if pieces:
            pieces[-1] += "\n\n"
            out += pieces
    return out


def fill(pool: list[str], tokens: int, count_tokens, rng: random.Random) -> list[str]:
    """Consecutive sentences of `pool`, from a random start (wrapping round), until `tokens` tokens."""
    start, kept, count = rng.randrange(len(pool)), [], 0
    while count < tokens:
        sentence = pool[(start + len(kept)) % len(pool)]
        kept.append(sentence)
        count += count_tokens(sentence)
        if len(kept) > 4 * len(pool):
            break
    return kept


def plant(filler: list[str], needles: list[tuple[float, str]]) -> str:
    """The filler with each needle put in as a sentence of its own at its depth (0..1)."""
    out = list(filler)
    for depth, needle in sorted(needles, key=lambda n: -n[0]):
        out.insert(round(depth * len(out)), needle)
    return "".join(s if s.endswith("\n\n") else s + " " for s in out).strip()


class Generator:
    """Tasks of one set at one length: `task(kind, trial, trials)`."""

    def __init__(self, which: str, tokens: int, count_tokens=lambda s: max(1, len(s) // 4), seed: int = 27):
        if which not in SETS:
            raise ValueError(f"unknown set {which!r}; one of {', '.join(SETS)}")
        self.set, self.tokens, self.count_tokens, self.seed = which, tokens, count_tokens, seed
        self.pool = sentences(haystack_text(which))

    def key(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            if self.set == "held-out" and rng.random() < 0.5:
                key = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            else:
                key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if key not in taken:
                taken.add(key)
                return key

    def value(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            if self.set == "dev":
                value = str(rng.randrange(1_000_000, 10_000_000))
            else:
                value = f"{rng.choice('ABCDEFGHKMNPRSTXZ')}{rng.choice('ABCDEFGHKMNPRSTXZ')}-{rng.randrange(10000, 99999)}"
            if value not in taken:
                taken.add(value)
                return value

    def task(self, kind: str, trial: int, trials: int) -> Task:
        rng = random.Random(f"{self.seed}/{self.set}/{kind}/{self.tokens}/{trial}")
        depth = (trial + 0.5) / trials
        filler = fill(self.pool, self.tokens, self.count_tokens, rng)
        make = {"one-key": self._one_key, "absent": self._absent, "multi-value": self._multi_value,
                "count": self._count, "passkey": self._passkey}[kind]
        text, question, expected, others, key = make(rng, depth, filler)
        return Task(kind, self.set, trial, depth, text, question, expected, others, key)

    def _keys_and_values(self, rng, n: int):
        keys, values = set(), set()
        return [(self.key(rng, keys), self.value(rng, values)) for _ in range(n)], keys, values

    def _one_key(self, rng, depth, filler):
        form = rng.choice(FORMATS[self.set])
        pairs, _, _ = self._keys_and_values(rng, rng.randint(5, 7))
        (key, value), others = pairs[0], pairs[1:]
        needles = [(depth, form.needle.format(key=key, value=value))]
        needles += [(rng.random(), form.needle.format(key=k, value=v)) for k, v in others]
        return (plant(filler, needles), rng.choice(form.single).format(key=key), [value], [v for _, v in others], key)

    def _absent(self, rng, depth, filler):
        form = rng.choice(FORMATS[self.set])
        pairs, keys, _ = self._keys_and_values(rng, rng.randint(3, 5))
        asked = self.key(rng, keys)
        needles = [(d, form.needle.format(key=k, value=v))
                   for d, (k, v) in zip([depth] + [rng.random() for _ in pairs[1:]], pairs)]
        return plant(filler, needles), rng.choice(form.single).format(key=asked), [], [v for _, v in pairs], asked

    def _multi_value(self, rng, depth, filler):
        form = rng.choice(FORMATS[self.set])
        n = rng.randint(2, 4)
        pairs, keys, values = self._keys_and_values(rng, 4)
        key = pairs[0][0]
        mine = [pairs[0][1]] + [self.value(rng, values) for _ in range(n - 1)]
        spread = [(depth + i / n) % 1.0 for i in range(n)]  # spread over the document, the first at `depth`
        needles = [(d, form.needle.format(key=key, value=v)) for d, v in zip(spread, mine)]
        needles += [(rng.random(), form.needle.format(key=k, value=v)) for k, v in pairs[1:]]
        return (plant(filler, needles), rng.choice(form.every).format(key=key), mine, [v for _, v in pairs[1:]], key)

    def _count(self, rng, depth, filler):
        records = RECORDS[self.set]
        n = rng.randint(5, 20)
        needles = [((depth + i / n) % 1.0, records.record.format(name=rng.choice(PAYERS), value=rng.randrange(2, 99)))
                   for i in range(n)]
        return plant(filler, needles), rng.choice(records.questions), [str(n)], [], ""

    def _passkey(self, rng, depth, filler):
        value = str(rng.randrange(10000, 99999))
        return plant(filler, [(depth, PASSKEY.format(value=value))]), "What is the pass key?", [value], [], ""


FIRST_NUMBER = re.compile(r"\b\d+\b")


def score(task: Task, answer: str) -> dict:
    """The issue's scoring of one answer: `right` (bool), `other` (another key's value is in the answer),
    `not_found`, and for multi-value the values found (share) and wrong (distractor values in it)."""
    other = [v for v in task.others if v in answer]
    not_found = answer.strip().startswith(NOT_FOUND)
    out = {"other": bool(other), "not_found": not_found}
    if task.kind == "absent":
        out["right"] = not_found and not other
    elif task.kind == "count":
        first = FIRST_NUMBER.search(answer)
        out["right"] = first is not None and first.group() == task.expected[0]
        out["counted"] = first.group() if first else None
    elif task.kind == "multi-value":
        found = [v for v in task.expected if v in answer]
        out.update(found=len(found), values=len(task.expected), wrong=len(other))
        out["right"] = len(found) == len(task.expected) and not other
    else:
        out["right"] = task.expected[0] in answer and not other
    return out
