"""The evidence for an answer in a document's own words: pure text work, no model.

`arbor ask` keeps a small model's answer only when a run of its words occurs verbatim in the part it
was read from and says more than the question does (`evidence`); the sentence holding that run is the
quote. The quote answers only when it carries the question's distinguishing terms and the answer's own
values (question_terms.py: "…for jasper-thistle is: 3978290" does not answer a question about
velvet-velvet); otherwise the finding is listed, marked as not answering. A second look reads the stretch
of a part around its likeliest sentence (`focus`). Why each rule is there: ask.py's docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .question_terms import FUNCTION_WORDS, SENTENCE_END, QuestionTerms, Support, sentences_of, starts_with_pronoun

MIN_EVIDENCE_WORDS = 3  # a run of this many words (or one word with a digit, or a content word) is evidence
# a run found more often in the document says nothing about where the answer is: a part that lacks the
# answer may still quote itself ("The pass key is the phrase 'The grass is green.'" in repeated filler)
MAX_QUOTE_REPEATS = 2
COMMON_IN = 0.5  # a question word found in more than this share of the parts ties no quote to the question
COMMON_MIN_PARTS = 3  # ... and in at least this many: in a 2-part document every word of the answer's part
# that the other part also uses would be "common" (docs/performance.md's figure was thrown away so)
WORDS = re.compile(r"\w+")
QUOTE_CHARS = 240  # a quote is the sentence holding the evidence, cut to this around it
WIDE_QUOTE_CHARS = 600  # ... or, where only more of it answers, up to this (the whole sentence, or two)
FOCUS_CHARS = 600  # what a second look reads of the best part: ~150 tokens around its likeliest sentence
# (Python's language reference, 7 questions: 5 answered with 600, 4 with 1,200; docs/long-context.md)


@dataclass
class Finding:
    part: int  # 1-based
    answer: str
    quote: str  # the evidence, as it is written in the document
    start: int  # the quote's character offset in the document
    score: float  # the part's rank score: log-probability of the question after it (nats)
    anchored: bool  # the quote carries the question's distinguishing terms (question_terms.py)
    match: str  # the answer's words the quote holds verbatim
    answers: bool | None = None  # anchored, and the quote holds the answer's values (default: anchored)
    lacks: list[str] = field(default_factory=list)  # what the quote lacks to answer: "term:…", "value:…"
    coverage: float = 0.0  # the share of the question's terms (by weight) the quote carries
    like: int | None = None  # found by its kind: the start of the model's quote it is like (ask_every_part.py)

    def __post_init__(self):
        if self.answers is None:
            self.answers = self.anchored


@dataclass(frozen=True)
class Evidence:
    """A run of an answer's words found verbatim in a part, and the sentence that holds it."""

    run: tuple[int, int]  # part[run[0]:run[1]]
    sentence: tuple[int, int]  # part[sentence[0]:sentence[1]]: the quote, at most QUOTE_CHARS (or two sentences)
    support: Support  # what the quote carries of the question and the answer

    @property
    def anchored(self) -> bool:
        return self.support.anchored

    @property
    def rank(self) -> tuple:
        return self.support.answers, self.support.anchored, self.support.coverage, self.run[1] - self.run[0]


def evidence(answer: str, part: str, question: str, common: frozenset[str] = frozenset(),
             document: DocumentWords | None = None, terms: QuestionTerms | None = None) -> Evidence | None:
    """The answer's best evidence in `part`: a run of its words that occurs verbatim there (case and
    spacing aside) and says more than the question (not only words the question holds; at least
    MIN_EVIDENCE_WORDS words, or a word with a digit, or a word found at most MAX_QUOTE_REPEATS times in
    the document, like "Endeavour"), and, given the document's words, occurs in it at most
    MAX_QUOTE_REPEATS times. Of the longest such run starting at each of the answer's words, the one whose
    quote answers (for the values of the answer's sentence that holds the run: "1.8. The pass key is 72077."
    is evidenced by "The pass key is 72077.") wins (`terms`: the question's terms, weighed by the document; uniform without), then the
    one carrying most of the question, then the longest: "…a null operation that is passed to the primary
    object involved" is evidenced by "pass is a null operation" (its sentence is about "pass"), not by the
    longer "passed to the primary object involved"."""
    terms = terms or QuestionTerms(question, common=common)
    answer_spans = [m.span() for m in WORDS.finditer(answer)]
    words = [answer[a:b].casefold() for a, b in answer_spans]
    asked = set(WORDS.findall(question.casefold()))
    spans = [(m.start(), m.end()) for m in WORDS.finditer(part)]
    part_words = [part[a:b].casefold() for a, b in spans]
    counted = document or DocumentWords(part)

    def rare(word: str) -> bool:
        return counted.count([word], MAX_QUOTE_REPEATS) <= MAX_QUOTE_REPEATS

    best = None
    for i in range(len(words)):  # answers are a sentence: quadratic in its words is nothing
        for j in range(len(words), i, -1):
            run = words[i:j]
            if not _says_more(run, asked, rare):
                break  # a shorter run from i says no more
            at = next(_runs(part_words, run), None)
            if at is None or (document is not None and document.count(run, MAX_QUOTE_REPEATS) > MAX_QUOTE_REPEATS):
                continue
            claim = whole_sentence(answer, answer_spans[i][0], answer_spans[j - 1][1])  # what the run evidences
            candidate = _quoted(part, (spans[at][0], spans[at + len(run) - 1][1]), terms, answer[claim[0]:claim[1]])
            if best is None or candidate.rank > best.rank:
                best = candidate
            break
    return best


def _quoted(part: str, found: tuple[int, int], terms: QuestionTerms, answer: str) -> Evidence:
    """The run's sentence as its quote, with what it carries. A quote that does not answer is widened when
    that makes it answer: a long sentence cut to QUOTE_CHARS is quoted whole (up to WIDE_QUOTE_CHARS: the
    GPL's "…is called an "aggregate" if…" names its subject 300 characters after the run), and one that
    starts with a pronoun ("He built the first tower in 1698.") with the sentence before it."""
    lo, hi = sentence_around(part, *found)
    quotes = [(lo, hi)]
    whole = whole_sentence(part, *found)
    if whole != (lo, hi) and whole[1] - whole[0] <= WIDE_QUOTE_CHARS:
        quotes.append(whole)
    if starts_with_pronoun(part[lo:hi]):
        before = [m.end() for m in SENTENCE_END.finditer(part, 0, max(lo - 1, 0))]
        wider = before[-1] if before else 0
        while wider < lo and part[wider].isspace():
            wider += 1
        if wider < lo and hi - wider <= WIDE_QUOTE_CHARS:
            quotes.append((wider, hi))
    evidenced = [Evidence(found, span, terms.support(part[span[0]:span[1]], answer)) for span in quotes]
    return evidenced[0] if evidenced[0].support.answers else max(evidenced, key=lambda e: e.rank)


def _says_more(run: list[str], asked: set[str], rare) -> bool:
    """Whether a run could be evidence: not only the question's words; MIN_EVIDENCE_WORDS words, or a word
    with a digit, or a rare word (`rare(word)`: "Endeavour" is; "loop", all over a text on loops, is not)."""
    if set(run) <= asked:
        return False
    return (len(run) >= MIN_EVIDENCE_WORDS or any(c.isdigit() for w in run for c in w)
            or any(w not in asked and w not in FUNCTION_WORDS and rare(w) for w in run))


def whole_sentence(part: str, start: int, end: int) -> tuple[int, int]:
    """The sentence(s) holding part[start:end], leading space aside."""
    before = [m.end() for m in SENTENCE_END.finditer(part, 0, start)]
    after = SENTENCE_END.search(part, end)
    lo, hi = before[-1] if before else 0, after.end() if after else len(part)
    while lo < start and part[lo].isspace():
        lo += 1
    return lo, hi


def sentence_around(part: str, start: int, end: int) -> tuple[int, int]:
    """The sentence(s) holding part[start:end], cut to QUOTE_CHARS around it (on spaces) when longer."""
    lo, hi = whole_sentence(part, start, end)
    spare = max(QUOTE_CHARS - (end - start), 0)
    if hi - lo > QUOTE_CHARS:
        lo = max(lo, start - spare // 2)
        hi = min(hi, end + spare - (start - lo))
        lo = part.find(" ", lo, start) + 1 if part.find(" ", lo, start) >= 0 else lo
        hi = part.rfind(" ", end, hi) if part.rfind(" ", end, hi) >= 0 else hi
    while lo < start and part[lo].isspace():
        lo += 1
    return lo, hi


def anchored(sentence: str, question: str, common: frozenset[str] = frozenset()) -> bool:
    """Whether `sentence` carries the question's distinguishing terms (question_terms.py), words of the
    document's `common` aside: "The pass key is 54635" answers "What is the pass key?" from its own
    sentence; "Aaron and his sons", copied by a part that missed the key, sits in a sentence that has
    nothing to do with the question; in Python's documentation "statement" ties nothing to anything."""
    return QuestionTerms(question, common=common).support(sentence).anchored


def common_words(parts: list[str]) -> frozenset[str]:
    """The words (casefolded) found in more than COMMON_IN of the parts, and in at least COMMON_MIN_PARTS:
    too common to tie a quote to a question (a 2-part document has none)."""
    counts: dict[str, int] = {}
    for part in parts:
        for word in set(WORDS.findall(part.casefold())):
            counts[word] = counts.get(word, 0) + 1
    return frozenset(w for w, n in counts.items() if n > COMMON_IN * len(parts) and n >= COMMON_MIN_PARTS)


class DocumentWords:
    """A document's words (casefolded) and where each occurs, to count a run's occurrences quickly."""

    def __init__(self, text: str):
        self.words = WORDS.findall(text.casefold())
        self.at: dict[str, list[int]] = {}
        for i, w in enumerate(self.words):
            self.at.setdefault(w, []).append(i)

    def count(self, run: list[str], most: int) -> int:
        """How often `run` occurs, counting no further than most + 1."""
        n, found = len(run), 0
        for k in self.at.get(run[0], ()) if run else ():
            if self.words[k:k + n] == run:
                found += 1
                if found > most:
                    break
        return found


def focus(part: str, question: str, common: frozenset[str] = frozenset(), terms: QuestionTerms | None = None) -> str:
    """The stretch of `part` a second look reads: the sentence carrying most of the question's terms
    (`terms`, as the quotes are weighed; without, the question's words beyond `common`) and its neighbours,
    about FOCUS_CHARS in all; the whole part when no sentence carries any. A tiny model reads a short text
    far better (a pass key in prose: 8/8 at 512 tokens, 5/8 at 2,048), and the part was already chosen by
    the model's own ranking."""
    terms = terms or QuestionTerms(question, common=common)
    sentences = sentences_of(part)
    shared = [terms.support(part[a:b]).coverage for a, b in sentences]
    if not sentences or max(shared) == 0 or len(part) <= FOCUS_CHARS:
        return part
    lo = hi = shared.index(max(shared))
    while sentences[hi][1] - sentences[lo][0] < FOCUS_CHARS and (lo > 0 or hi + 1 < len(sentences)):
        if hi + 1 < len(sentences):  # a sentence after the best one, then one before: it stays central
            hi += 1
        if lo > 0 and sentences[hi][1] - sentences[lo][0] < FOCUS_CHARS:
            lo -= 1
    return part[sentences[lo][0]:sentences[hi][1]].strip()


def named_sentences(part: str, terms: QuestionTerms, limit: int = FOCUS_CHARS) -> str:
    """The part's sentences that carry what the question names (one starting with a pronoun with the
    sentence before it), in order, up to about `limit` characters: what a last look reads when the part and
    the stretch around its best sentence gave no answering quote. A tiny model copies from one sentence what
    it misses in 150 tokens of licence text around it (held-out one-key task at 16K, trial 2: the part and
    the second look answered with section headings, these sentences alone with the key's serial)."""
    spans, picked = sentences_of(part), []
    for k, (lo, hi) in enumerate(spans):
        if terms.support(part[lo:hi]).anchored:
            picked.append((lo, hi))
        elif k and starts_with_pronoun(part[lo:hi].strip()) and terms.support(part[spans[k - 1][0]:hi]).anchored:
            picked.append((spans[k - 1][0], hi))
    out, size = [], 0
    for lo, hi in picked:
        sentence = part[lo:hi].strip()
        if out and size + len(sentence) > limit:
            break
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)


def _runs(haystack: list[str], run: list[str]):
    """The indices where `run` occurs in `haystack`, in order."""
    n = len(run)
    for k in range(len(haystack) - n + 1):
        if haystack[k] == run[0] and haystack[k:k + n] == run:
            yield k


def finding(reply_text: str, part: str, offset: int, question: str, index: int, score: float,
            common: frozenset[str] = frozenset(), document: DocumentWords | None = None,
            terms: QuestionTerms | None = None) -> Finding | None:
    found = evidence(reply_text, part, question, common, document, terms)
    if found is None:
        return None
    (a, b), (lo, hi), support = found.run, found.sentence, found.support
    return Finding(index, reply_text.strip(), part[lo:hi], offset + lo, round(score, 3), support.anchored, part[a:b],
                   support.answers, list(support.lacks), support.coverage)


def finding_rank(finding: Finding) -> tuple:
    """Answering findings first, then anchored ones, then by their part's score, then the longer match."""
    return finding.answers, finding.anchored, finding.score, len(finding.match)
