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

from .evidence import DocumentWords, Finding, finding
from .question_terms import TERM, QuestionTerms, SentenceCounts, sentences_of

WHOLE_DOCUMENT = re.compile(r"^\s*how\s+(many|often)\b|\b(all|every|each)\b|^\s*(list|enumerate)\b"
                            r"|^\s*which\s+\w+[^\Ws]s\b|\bwhich\b.*\bmention", re.IGNORECASE)
COUNT = re.compile(r"^\s*how\s+many\b", re.IGNORECASE)
SAME_SHAPE = 0.7  # a sentence this alike in shape to an answering quote (multiset Jaccard) is of its kind
SHAPE_CHARS = 400  # longer sentences are prose, not records: no sentence of a kind is this long


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


def read_every_part(model, reader, text: str, starts: list[int], parts: list[str], question: str, progress
               ) -> tuple[list[dict], list[Finding], list[Finding]]:
    """Every part read and answered (`reader`: ask's DocumentReader; as many at once as the door runs): the
    parts' records (part, score, reply), the answering findings (document order, one per sentence, each
    named by its particulars), and the closest findings that do not answer."""
    offsets = [text.index(part, start) for part, start in zip(parts, starts)]

    def read_and_answer(index: int) -> tuple[int, str, float]:
        reading = reader.read(parts[index - 1], question)
        return index, reader.answer(reading).text, reading.score

    progress.begin(f"reading every part ({len(parts)})", len(parts))
    first = read_and_answer(1)  # finds out once whether the door scores prompts
    progress.advance()
    replies = [first, *model.map(read_and_answer, range(2, len(parts) + 1), progress.advance)]
    terms = QuestionTerms(question, SentenceCounts(text))
    kept, others = part_findings(replies, parts, offsets, question, terms, DocumentWords(text))

    def part_of(offset: int) -> int:
        return max(i for i, at in enumerate(offsets, 1) if at <= offset)

    found = named_by_particulars(merged(kept + of_their_kind(text, kept, terms, part_of)))
    records = [{"part": i, "score": round(score, 3), "reply": reply.strip()} for i, reply, score in replies]
    return records, found, sorted(others, key=lambda f: (-f.coverage, -f.score))[:3]


def part_findings(replies: list[tuple[int, str, float]], parts: list[str], offsets: list[int], question: str,
                  terms: QuestionTerms, document: DocumentWords) -> tuple[list[Finding], list[Finding]]:
    """Each part's reply (part number, reply, score) as a finding: the answering ones, and the others."""
    kept, others = [], []
    for index, reply, score in replies:
        found = finding(reply, parts[index - 1], offsets[index - 1], question, index, score,
                        document=document, terms=terms)
        if found is not None:
            (kept if found.answers else others).append(found)
    return kept, others


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
