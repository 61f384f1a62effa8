"""What a quote must carry to answer a question: the question's distinguishing terms. Pure text, no model.

A quote shows that words are in the document; it does not show that they answer the question. "One of the
special magic numbers for jasper-thistle is: 3978290" is a real quote, and no answer to "What is the special
magic number for velvet-velvet?". So a finding answers only when its sentence carries what the question
asks *about*:

- **named terms**, by their form: a number ("1698"), a joined compound ("velvet-velvet", "v1.2", "qwen2.5"),
  a quoted word ('the "pass" statement'), a capitalised name past the question's first word ("Ilse Varga",
  "Boolean"). Each must be in the quote, unless the document uses it in more than COMMON_SHARE of its
  sentences and at least COMMON_MIN (then it tells no sentence from another: "Python" in Python's
  documentation). A named term the document never uses cannot be quoted: nothing answers;
- **content terms**: the question's other words, less FUNCTION_WORDS and FRAME_WORDS (words about the
  asking, "mentioned", "text", "list", and about the kind of answer, "number", "name", "year"). The quote
  must carry at least COVERAGE of the terms' weight, a term's weight being its inverse sentence frequency
  in the document: a word found in every other sentence ("statement" in Python's reference, any word of a
  2-part document the old part-count rule called common) weighs little, a rare one much. This scales with
  the document's sentences, not with its number of parts. A content term the document never uses weighs
  nothing (the question's own wording), unless most of them are so (then the question is off the
  document's topic, and nothing answers).

And the quote must hold the answer's own content: every number and compound of the answer that the
question does not hold (`answer_values`), so "velvet-velvet is 3978290" is not evidenced by a sentence
about velvet-velvet that gives another number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

WORDS = re.compile(r"\w+")
TERM = re.compile(r"\w+(?:[-_.]\w+)*")  # "velvet-velvet", "3.14", "qwen2.5-coder" are one term
QUOTED = re.compile(r"\"([^\"]{1,60})\"|\u201c([^\u201d]{1,60})\u201d|`([^`]{1,60})`|(?<!\w)'([^']{1,60})'(?!\w)")
SENTENCE_END = re.compile(r"[.!?](?=\s)|\n[ \t]*\n")  # a wrapped line goes on; a blank line ends
# words that tie no sentence to a question
FUNCTION_WORDS = frozenset("""a an the is are was were be been being am do does did done have has had what which
who whom whose when where why how of in on at to for by with from and or nor not no yes it its this that these those
there here their they them he she his her him i you we our your my me us as about into onto than then so if but
can could will would shall should may might must text document question answer say says said tell someone somebody
something anyone anybody anything everyone everybody everything nobody nothing""".split())
# words about the asking, about what a document does ("does the text contain"), or about the kind of answer
# wanted: a quote need not repeat them
FRAME_WORDS = frozenset("""mentioned mention mentions provided given give stated state states written according
passage list every all each many much any some other one ones number numbers name names year years date dates
value values kind sort type find found show shown time times contain contains include includes hold holds
describe describes cover covers""".split())
PRONOUNS = frozenset("he she it they this these that his her its their there such".split())
COMMON_SHARE = 0.03  # a named term in more than this share of the document's sentences distinguishes nothing
COMMON_MIN = 8  # ... and in at least this many (a key with four values, a name said twice, is no topic)
COVERAGE = 0.5  # the share of the terms' weight a quote must carry
ABSENT_SHARE = 0.5  # a question more of whose content terms than this the document never uses is off its topic


def stem(word: str) -> str:
    """A word without a plural or third-person ending, so "continues" meets "continue", "entries" "entry" and
    "literals" "literal" (and nothing more: "passed" is not "pass")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def root(word: str) -> str:
    """A content word's root (of its stem): "signed" and "signing" meet "sign", "created" "create". Named
    terms keep their stem ("pass" the statement is not "passed")."""
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":  # "stopp" → "stop"; "pass" stays
        word = word[:-1]
    return word


def words_of(text: str) -> list[str]:
    """The text's words, casefolded and stemmed: what terms are matched against."""
    return [stem(w) for w in WORDS.findall(text.casefold())]


@dataclass(frozen=True)
class Term:
    text: str  # as the question writes it
    words: tuple[str, ...]  # words_of(text), for a content term their roots: found where these occur in a row
    named: bool  # a number, compound, quoted word or capitalised name


def _term(text: str, named: bool) -> Term | None:
    words = tuple(w if named else root(w) for w in words_of(text))
    return Term(text, words, named) if words else None


def question_terms(question: str, common: frozenset[str] = frozenset()) -> list[Term]:
    """The question's named and content terms (see the module docstring), each once, in order. Words in
    `common` (casefolded) are no content terms."""
    terms: list[Term] = []
    quoted = [m.span() for m in QUOTED.finditer(question)]
    for m in QUOTED.finditer(question):
        terms.append(_term(next(g for g in m.groups() if g is not None), True))
    tokens = [m for m in TERM.finditer(question) if not any(a <= m.start() < b for a, b in quoted)]
    name: list[str] = []
    for i, m in enumerate(tokens):
        word = m.group()
        capital = i > 0 and word[0].isupper() and word.casefold() not in FUNCTION_WORDS | FRAME_WORDS
        if capital and not any(c.isdigit() for c in word):
            name.append(word)  # "Ilse Varga": one name
            continue
        if name:
            terms.append(_term(" ".join(name), True))
            name = []
        if any(c.isdigit() for c in word) or re.search(r"\w[-_.]\w", word):
            terms.append(_term(word, True))
        elif (folded := word.casefold()) not in FUNCTION_WORDS | FRAME_WORDS and folded not in common:
            terms.append(_term(folded, False))
    if name:
        terms.append(_term(" ".join(name), True))
    unique = {}
    for term in terms:
        if term is not None and term.words not in unique:
            unique[term.words] = term
    return list(unique.values())


def holds(words: list[str], term_words: tuple[str, ...]) -> bool:
    """Whether `term_words` occur in a row in `words` (both as words_of gives them)."""
    n = len(term_words)
    return any(words[k:k + n] == list(term_words) for k, w in enumerate(words) if w == term_words[0])


def sentences_of(text: str) -> list[tuple[int, int]]:
    """The text's sentences as spans (a blank line ends one too), empty ones left out."""
    bounds = [0, *(m.end() for m in SENTENCE_END.finditer(text)), len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


class SentenceCounts:
    """In which of a document's sentences each word occurs (stemmed, and apart from that its root): the
    weight of a question's terms, and where to look for them. Kept as postings (word -> the ids of the
    sentences holding it, ascending), so a question's terms are counted and found without reading every
    sentence again, and a document's counts can be kept with its cache (document_index.py)."""

    def __init__(self, text: str, postings: tuple[dict[str, list[int]], dict[str, list[int]]] | None = None):
        self.text = text
        self.spans = sentences_of(text)
        if postings is None:
            postings = self._postings(text, self.spans)
        self.stems, self.roots = postings

    @staticmethod
    def _postings(text: str, spans: list[tuple[int, int]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        stems: dict[str, list[int]] = {}
        roots: dict[str, list[int]] = {}
        root_of: dict[str, str] = {}
        for i, (a, b) in enumerate(spans):
            words = set(words_of(text[a:b]))
            for w in words:
                stems.setdefault(w, []).append(i)
            for r in {root_of.get(w) or root_of.setdefault(w, root(w)) for w in words}:
                roots.setdefault(r, []).append(i)
        return stems, roots

    def __len__(self) -> int:
        return len(self.spans)

    def _words(self, i: int, named: bool) -> list[str]:
        a, b = self.spans[i]
        words = words_of(self.text[a:b])
        return words if named else [root(w) for w in words]

    def holding(self, term: Term) -> list[int]:
        """The ids of the sentences holding the term (its words in a row), ascending."""
        postings = self.stems if term.named else self.roots
        if len(term.words) == 1:
            return postings.get(term.words[0], [])
        rarest = min(term.words, key=lambda w: len(postings.get(w, ())))
        return [i for i in postings.get(rarest, []) if holds(self._words(i, term.named), term.words)]

    def with_a_word_of(self, term: Term) -> list[int]:
        """The ids of the sentences holding the term's first word: every sentence that can hold the term,
        and every one that holds its start where a sentence is cut."""
        return (self.stems if term.named else self.roots).get(term.words[0], [])

    def count(self, term: Term) -> int:
        """The sentences holding the term (its words in a row)."""
        return len(self.holding(term))

    def weight(self, term: Term) -> float:
        return math.log(1 + len(self.spans) / (self.count(term) + 0.5))

    def common(self, term: Term) -> bool:
        n = self.count(term)
        return n >= COMMON_MIN and n > COMMON_SHARE * len(self.spans)


@dataclass(frozen=True)
class Support:
    """How far a sentence carries a question's terms and an answer's content."""

    carried: tuple[str, ...]  # the terms it holds
    lacks: tuple[str, ...]  # "term:…" it would need, "value:…" of the answer it does not hold
    coverage: float  # the share of the terms' weight it carries (0 for a question without terms)
    anchored: bool  # about what the question asks (QuestionTerms.support)

    @property
    def answers(self) -> bool:
        return self.anchored and not self.lacks


class QuestionTerms:
    """A question's terms, weighed by a document's sentences (uniform without one). A content term the
    document never uses weighs nothing (a question's own wording, "fast" for a table of tok/s), but a
    question most of whose content terms the document never uses is about something else."""

    def __init__(self, question: str, counts: SentenceCounts | None = None, common: frozenset[str] = frozenset()):
        self.terms = question_terms(question, common)
        self.weights = {t.words: counts.weight(t) if counts else 1.0 for t in self.terms}
        self.required = [t for t in self.terms if t.named and not (counts and counts.common(t))]
        content = [t for t in self.terms if not t.named]
        self.unused = [t for t in content if counts and counts.count(t) == 0]
        for t in self.unused:
            self.weights[t.words] = 0.0
        self.off_topic = len(self.unused) > ABSENT_SHARE * len(content)
        self.question_words = set(words_of(question))

    def support(self, sentence: str, answer: str = "") -> Support:
        words = words_of(sentence)
        roots = [root(w) for w in words]
        carried = [t for t in self.terms if holds(words if t.named else roots, t.words)]
        total = sum(self.weights.values())
        coverage = sum(self.weights[t.words] for t in carried) / total if total else 0.0  # no terms: ties nothing
        covered = coverage >= COVERAGE and not self.off_topic
        missing = [t for t in self.terms if t not in carried and (t in self.required or not covered)]
        anchored = covered and not any(t in self.required for t in missing)
        lacks = [f"term:{t.text}" for t in missing]
        lacks += [f"value:{v.text}" for v in answer_values(answer, self.question_words) if not holds(words, v.words)]
        return Support(tuple(t.text for t in carried), tuple(lacks), round(coverage, 3), anchored)


def answer_values(answer: str, question_words: set[str]) -> list[Term]:
    """The answer's own content a quote must hold: its numbers and joined compounds that the question does
    not hold ("3978290" in "The number for velvet-velvet is 3978290"; not "velvet-velvet")."""
    values = {}
    for m in TERM.finditer(answer):
        word = m.group()
        if any(c.isdigit() for c in word) or re.search(r"\w[-_.]\w", word):
            term = _term(word, True)
            if term is not None and not set(term.words) <= question_words:
                values[term.words] = term
    return list(values.values())


def starts_with_pronoun(sentence: str) -> bool:
    """"He built the first tower in 1698.": the sentence before it says who."""
    first = WORDS.match(sentence.lstrip(" \t\n\"'(\u201c"))
    return bool(first) and first.group().casefold() in PRONOUNS
