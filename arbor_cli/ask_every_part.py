"""Whole-document questions ("What are all …", "list every …", "how many …", "which … mention …"):
every part read and answered, every answering finding kept, the same sentence found by two overlapping
parts kept once, and the answer listing them all (a count first when one was asked), each with its quote
and place. ask.py sends a question here when `whole_document_question` says so, or with `--all`.

A small model asked about a part copies one sentence, even where the part holds several answers (two of
a key's values, three records). So each answering quote also stands for the sentences of its kind: a
sentence anywhere in the document that carries the question's terms just as well and has the quote's
shape (the same words, numbers and names aside: `shape`, SAME_SHAPE) is a finding too, marked `like` the
quote the model gave. Records, list items and table rows are written so; a sentence that is not of the
quote's kind must be found by its own part's reading.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from .document_reader import QuoteJudge
from .evidence import DocumentWords, Finding, finding
from .question_terms import TERM, QuestionTerms, answer_values, sentences_of, starts_with_pronoun

# "how many days" asks for a quantity the text states, not for things to count
UNITS = (r"(?:seconds?|minutes?|hours?|days?|weeks?|months?|years?|bytes?|[kmgt]i?b|tokens?|percent|"
         r"metres?|meters?|miles?|kilometres?|kilometers?|degrees?|dollars?|euros?|pounds?)\b")
COUNT = re.compile(rf"^\s*how\s+many\b(?!\s+{UNITS})", re.IGNORECASE)
WHOLE_DOCUMENT = re.compile(rf"{COUNT.pattern}|\b(all|every)\b|^\s*(list|enumerate)\b"
                            r"|^\s*which\s+\w+[^\Ws]s\b|\bwhich\b.*\bmention", re.IGNORECASE)
SAME_SHAPE = 0.7  # a sentence this alike in shape to an answering quote (multiset Jaccard) is of its kind
SHAPE_CHARS = 400  # longer sentences are prose, not records: no sentence of a kind is this long
CLOSEST = 3  # findings that do not answer, listed (--json) for the reader to check
JUDGED = 64  # candidate sentences the model judges where no reply pointed at one
VALUE = re.compile(r"\d|\w[-_.]\w")  # a number or a joined code: what a reply's run must hold to point


def whole_document_question(question: str) -> bool:
    return bool(WHOLE_DOCUMENT.search(question))


def shape(sentence: str) -> Counter:
    """The sentence's words with its particulars made alike: a number or code is "#", a capitalised word
    past the first is "^" ("Ledger entry: Mara Quill paid 48 shillings." and "Ledger entry: Ivo Marsh paid 7
    shillings." have one shape)."""
    out = Counter()
    for i, m in enumerate(TERM.finditer(sentence)):
        word = m.group()
        out["#" if any(c.isdigit() for c in word) else "^" if i and word[0].isupper() else word.casefold()] += 1
    return out


def alike(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 0.0


def part_places(text: str, starts: list[int], parts: list[str]):
    """(where each part starts in `text`, part_of(offset): the number of the last part starting at or before
    an offset: the part a sentence is read in)."""
    offsets = [text.index(part, start) for part, start in zip(parts, starts)]

    def part_of(offset: int) -> int:
        return max(i for i, at in enumerate(offsets, 1) if at <= offset)

    return offsets, part_of


def read_every_part(model, reader, text: str, starts: list[int], parts: list[str], question: str, progress,
                    terms: QuestionTerms, read: list[int]) -> tuple[list[dict], list[Finding], list[Finding]]:
    """Every part searched (`terms`: the question's, weighed by `text`'s sentences); those numbered `read`, each
    with a sentence carrying the question's terms (`candidates`: no other can hold an answering quote), read and
    answered by `reader` (ask's DocumentReader; as many at once as the door runs). A reply gives a finding when it points at such a sentence (`pointed`); where no reply does,
    the model's own judgement picks one (`judged`). The sentences of their kind follow. Returns the read
    parts' records (part, score, reply), the answering findings (document order, one per sentence, named by
    their particulars) and the closest findings that do not answer."""
    offsets, part_of = part_places(text, starts, parts)
    document = DocumentWords(text)

    def read_and_answer(index: int) -> tuple[dict, Finding | None]:
        part, offset = parts[index - 1], offsets[index - 1]
        reading = reader.read(part, part_question(question))
        record = {"part": index, "score": round(reading.score, 3), "reply": reader.answer(reading).text.strip()}
        return record, finding(record["reply"], part, offset, question, index, reading.score, document=document,
                               terms=terms)

    progress.begin(f"reading the {len(read)} of {len(parts)} parts that name what is asked", max(len(read), 1))
    done = [read_and_answer(read[0])] if read else []  # the first alone: finds out whether the door scores
    progress.advance()
    done += list(model.map(read_and_answer, read[1:], progress.advance))
    kept = [p for _, f in done if (p := pointed(f, terms)) is not None]
    kin = of_their_kind(text, kept, terms, part_of)
    if read and not kept:  # the model's pick stands only where the document repeats its kind (below)
        kept = judged(text, terms, QuoteJudge(model, question), part_of)
        kin = of_their_kind(text, kept, terms, part_of)
        kept, kin = (kept, kin) if len(merged(kept + kin)) > 1 else ([], [])
    others = [f for _, f in done if f is not None and pointed(f, terms) is None]
    found = named_by_particulars(merged(kept + kin))
    closest = sorted(others, key=lambda f: (-f.coverage, -f.score))[:CLOSEST] or nearest(text, terms, part_of)
    return [record for record, _ in done], found, closest


def pointed(found: Finding | None, terms: QuestionTerms) -> Finding | None:
    """A reply's finding, as a whole-document question takes it: its quote carries the question's terms and
    the reply's verbatim run holds a value of it ("Jonah Pike paid 9 shillings", from a reply that went on to
    list numbers of its own). What the reply says beyond its quote is dropped: the run is the answer. A quote
    of several sentences narrows to the one that carries the question (a record, not the prose after it)."""
    if found is None or not found.anchored:
        return None
    if not found.answers:
        if any(item.startswith("term:") for item in found.lacks) or not VALUE.search(found.match):
            return None
        found = replace(found, answer=found.match, answers=True, lacks=[])
    spans = sentences_of(found.quote)
    carrying = [(lo, hi) for lo, hi in spans if terms.support(found.quote[lo:hi]).anchored
                and VALUE.search(found.quote[lo:hi])]
    if len(spans) > 1 and len(carrying) == 1:
        lo, hi = carrying[0]
        lo += len(found.quote[lo:hi]) - len(found.quote[lo:hi].lstrip())
        found = replace(found, quote=found.quote[lo:hi].strip(), start=found.start + lo)
    return found


def judged(text: str, terms: QuestionTerms, judge: QuoteJudge, part_of) -> list[Finding]:
    """Where no reply points at an answering sentence: of the sentences carrying the question's terms and a
    value it lacks (at most JUDGED of them, those carrying most of the question first), the one after which
    the model finds the question most expected (QuoteJudge.lift, above 0: likelier than after a neutral
    text). Its lift is no verdict on its own: dev record sentences scored +0.4..+0.8 and were all right,
    real-document sentences +0.6..+5.0 either way (docs/long-context.md); it picks, and the pick stands only with sentences
    of its kind beside it (records, a list: a question for all of something), which then follow it. Alone, it
    answered "Which values are interpreted as false in Boolean operations?" with a sentence about Boolean
    results in Python's reference."""
    found = []
    for lo, hi in sentences_of(text):
        while lo < hi and text[lo].isspace():
            lo += 1
        sentence = text[lo:hi].strip()
        values = answer_values(sentence, terms.question_words)
        if values and len(sentence) <= SHAPE_CHARS and (support := terms.support(sentence)).anchored:
            found.append(Finding(part_of(lo), " ".join(v.text for v in values), sentence, lo, 0.0, True, sentence,
                                 True, [], support.coverage))
    found = sorted(found, key=lambda f: -f.coverage)[:JUDGED]
    lifts = [(judge.lift(f.quote), f) for f in found]
    best = max([(lift, f) for lift, f in lifts if lift is not None and lift > 0], key=lambda x: x[0], default=None)
    return [] if best is None else [replace(best[1], score=round(best[0], 3))]


def nearest(text: str, terms: QuestionTerms, part_of) -> list[Finding]:
    """The CLOSEST sentences to the question (most of its terms by weight) as findings that do not answer,
    where no reply gave one: what the reader may check."""
    scored = []
    for lo, hi in sentences_of(text):
        while lo < hi and text[lo].isspace():
            lo += 1
        support = terms.support(text[lo:hi])
        if support.coverage > 0 and len(text[lo:hi].strip()) <= SHAPE_CHARS:
            scored.append((support.coverage, lo, text[lo:hi].strip(), support))
    scored.sort(key=lambda row: (-row[0], row[1]))
    return [Finding(part_of(lo), "", sentence, lo, 0.0, False, "", False, list(support.lacks), coverage)
            for coverage, lo, sentence, support in scored[:CLOSEST]]


def part_question(question: str) -> str:
    """What each part is asked: a count is made of the things counted, so "How many ledger entries are
    there?" asks a part "Which ledger entries are there?" (a small model answers "how many" with a number
    of its own, which no part's text evidences)."""
    return COUNT.sub("Which", question, count=1)


def candidates(part: str, terms: QuestionTerms) -> bool:
    """Whether a sentence of the part (or one starting with a pronoun, with the sentence before it) carries
    the question's terms: only such a part can give an answering quote."""
    spans = sentences_of(part)
    for k, (lo, hi) in enumerate(spans):
        if terms.support(part[lo:hi]).anchored:
            return True
        if k and starts_with_pronoun(part[lo:hi].strip()) and terms.support(part[spans[k - 1][0]:hi]).anchored:
            return True
    return False


def of_their_kind(text: str, found: list[Finding], terms: QuestionTerms, part_of) -> list[Finding]:
    """The document's sentences of the same kind as the answering findings (see the module docstring), each a
    finding `like` the quote it resembles; `part_of(offset)` is the part an offset is read in."""
    kinds = [(f, shape(f.quote)) for f in found]
    out: list[Finding] = []
    if not kinds:
        return out
    for lo, hi in sentences_of(text):
        while lo < hi and text[lo].isspace():
            lo += 1
        sentence = text[lo:hi].strip()
        if not sentence or len(sentence) > SHAPE_CHARS:
            continue
        mine = shape(sentence)
        best = max(kinds, key=lambda kind: alike(mine, kind[1]))
        if alike(mine, best[1]) < SAME_SHAPE:
            continue
        support = terms.support(sentence)
        if support.anchored:
            example = best[0]
            out.append(replace(example, part=part_of(lo), answer=sentence, quote=sentence, start=lo, match=sentence,
                               anchored=True, answers=True, lacks=[], coverage=support.coverage, like=example.start))
    return out


def merged(findings: list[Finding]) -> list[Finding]:
    """One finding per quoted stretch (overlapping parts read the same sentence twice; a quote and the
    sentence of its kind found at the same place), in document order; of two overlapping, the model's own
    over one found by its kind."""
    out: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.like is not None, f.start)):  # the model's own first
        if not any(f.start < g.start + len(g.quote) and g.start < f.start + len(f.quote) for g in out):
            out.append(f)
    return sorted(out, key=lambda f: f.start)


def named_by_particulars(findings: list[Finding]) -> list[Finding]:
    """Findings of one kind (quotes of one shape) named by what tells each from the others: "1589269", not
    the model's sentence about one of them. A finding of no kind keeps the model's answer."""
    groups: list[list[tuple[Finding, Counter]]] = []
    for f in findings:
        mine = shape(f.quote)
        group = next((g for g in groups if alike(mine, g[0][1]) >= SAME_SHAPE), None)
        (group.append((f, mine)) if group is not None else groups.append([(f, mine)]))
    out = []
    for group in groups:
        if len(group) < 2:
            out.append(group[0][0])
            continue
        words = [Counter(m.group().casefold() for m in TERM.finditer(f.quote)) for f, _ in group]
        frame = words[0]
        for w in words[1:]:
            frame = frame & w
        out += [replace(f, answer=_beyond(f.quote, frame)) for f, _ in group]
    return sorted(out, key=lambda f: f.start)


def _beyond(sentence: str, frame: Counter) -> str:
    """The sentence's words beyond `frame` (what its kind shares), in order; the sentence if none."""
    left, words = Counter(frame), []
    for m in TERM.finditer(sentence):
        if left[m.group().casefold()] > 0:
            left[m.group().casefold()] -= 1
        else:
            words.append(m.group())
    return " ".join(words) or sentence


def listing(findings: list[Finding], parts: int, count: bool, name_of=None) -> str:
    """The answer: a count first when one was asked, then each finding with its place and quote."""
    lines = [f"{len(findings)}." if count else f"{len(findings)} found:"] if count or len(findings) > 1 else []
    for f in findings:
        where = f"{name_of(f.start)}, " if name_of else ""
        place = f"part {f.part} of {parts}: " if parts > 1 else ""
        line = f"{f.answer} ({where}{place}\u201c{' '.join(f.quote.split())}\u201d)"
        lines.append(f"- {line}" if lines else line)
    return "\n".join(lines)
