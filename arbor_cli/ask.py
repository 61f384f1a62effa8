"""Questions about a document of any length (`arbor ask`), answered in one pass or part by part.

Plain attention stops retrieving long before the context ends: the 135M model finds a pass key
hidden in real prose 75% of the time at 2K tokens and never from 32K (docs/long-context.md). So:

- a document within `reliable_tokens(model)` is asked in one pass: the document, then the question;
- a longer one is cut into parts of that size, as the summariser cuts it (chunking.py). Only a part with a
  sentence carrying what the question names can give a quote that answers (below), so only those parts
  are read (none: NOT_FOUND at once, the nearest sentences listed; a 16K-token document's parts all read
  took ~100 s on a 2-core CPU for that same answer). Each is read with the question after it, and the
  model's own log-probability of the question after the part ranks them (query likelihood: a part that holds the answer makes the question expected; on the
  135M model the part holding a pass key in prose scored -69 nats against -88 for the best other,
  8 of 8). The best-ranked parts answer. A small model asked about a part without the answer invents
  one (../shared/design/ask-probe.md), so an answer is kept only with *evidence*: a run of its words
  that occurs verbatim in that part's text and says more than the question does. When the best part's
  answer has none, that part is read once more with the question before its text (a second look,
  uncached; skipped when the document nowhere carries what the question names: then no quote can answer),
  and when that has none either, once more with only the part's sentences naming what is asked (a last look). The kept findings carry their part, quote and score, and the answer names where it came from;
- a quote proves that words are in the document, not that they answer: a finding answers only when its
  quote carries the question's distinguishing terms and the answer's own values (question_terms.py);
  with none that answers, the answer is NOT_FOUND and the findings (--json) say what their quotes lack.
  One pass is held to the same rule (a reply without an answering quote is no answer: on the 1.5B model
  the GPL v3, ~8K tokens, is one pass, and replies with no such quote were wrong 3 times of 3);
- a question for all of something ("what are all", "list every", "how many", "which … mention", or
  `--all`) does not fit "the best three parts answer": every part naming what is asked is read, and every
  answering finding listed (ask_every_part.py).

The prompt is the one that measured best on the 135M model (pass key in real prose, 8 trials per
size, /tmp probes recorded in docs/long-context.md): the text, then "Question: …", then the instruction
to answer with the text's exact words (8/8 at 1,024 tokens, 5/8 at 2,048; with the question alone
0/8, with the passkey eval's "There is an important piece of information hidden…" 0/8). Putting the
question first reads even better (8/8, 7/8) but then no two questions share a prefix, so it is kept for
the second look, where one part is read again.

The document's part of each prompt (the whole document, or each part) is prefilled once and kept on
disk (doc_cache.py): a later question loads it and prefills only itself, then scores and answers. The
reading itself (prompts, the question scored after a part, the second look) is document_reader.py's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from arbor_core.errors import UsageError

from .ask_every_part import COUNT, listing, nearest, part_places, read_every_part, whole_document_question
from .document_index import index_for
from .document_reader import DocumentReader, keep_the_cache, second_look
from .documents import Document
from .evidence import DocumentWords, Finding, common_words, finding, finding_rank, focus, named_sentences
from .extract import label_at
from .progress import NoProgress
from .question_terms import QuestionTerms, SentenceCounts

ANSWERED_PARTS = 3  # the best-ranked parts that answer; more only while none has given evidence
MAX_ANSWERED_PARTS = 12  # "the document does not seem to say" after this many best-ranked parts
NOT_FOUND = "The document does not seem to say."


@dataclass
class Answer:
    text: str
    path: str  # "one pass", "parts" (the best-ranked answer) or "every part" (a whole-document question)
    parts: int = 1
    tokens: int = 0  # the document's
    answered: list[dict] = field(default_factory=list)  # part, score, reply (second_look): best-ranked first
    findings: list[Finding] = field(default_factory=list)  # the one the answer gives first
    cache: dict = field(default_factory=dict)  # parts whose document prefix came from disk / was prefilled
    timings: dict = field(default_factory=dict)
    document: str | None = None  # several documents: the one the answer's quote comes from
    documents: list[dict] = field(default_factory=list)  # several documents: name, start (in the joined text)
    location: dict | None = None  # the answer's quote: document, location (label), start, end (in its own text)
    places: list[dict] | None = None  # each finding's, as `location`; None: a text asked alone (ask())
    read: int | None = None  # "parts": how many were read (those naming what is asked)

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.documents:
            del out["document"], out["documents"]
        for found, place in zip(out["findings"], out.pop("places") or []):
            found.update(place)
        if self.places is None:  # a text without a location map, asked alone: the JSON it always had
            del out["location"]
        if self.read is None:
            del out["read"]
        return out


def reliable_tokens(model) -> int:
    """The longest text the model is asked about in one piece: measured for known models (the
    registry's reliable_tokens), else a quarter of the trained context within 1K..16K."""
    from arbor_weights import KNOWN_ADAPTERS, KNOWN_MODELS

    checkpoint = getattr(model, "checkpoint", None)
    for known in (*KNOWN_MODELS.values(), *KNOWN_ADAPTERS.values()):  # by name, or by where a path's weights came from
        if checkpoint is not None and checkpoint.name == known.name or getattr(checkpoint, "source", None) == known.source:
            if known.reliable_tokens:
                return known.reliable_tokens
            break
    return min(max(model.config.trained_context // 4, 1024), 16384)


DOCUMENT_HEADING = "Document: {name}"


def ask_documents(model, documents: list[Document], question: str, **options) -> Answer:
    """ask() over documents (Document, or (name, text) pairs): several are read as one text, each under a
    heading with its name. The answer names where its quote comes from: the document when there are
    several, and the page, heading or chapter when the document has a location map ("report.pdf, p. 12");
    --json gives each finding's document, location and span in that document's own text."""
    documents = [d if isinstance(d, Document) else Document(*d) for d in documents]
    if len(documents) == 1 and not documents[0].locations:
        return ask(model, documents[0].text, question, **options)
    if len(documents) == 1:
        text, places = documents[0].text, Places(documents, [0], [0])
    else:
        pieces, starts, shifts, at = [], [], [], 0
        for document in documents:
            heading = DOCUMENT_HEADING.format(name=document.name) + "\n\n"
            body = document.text.strip()
            starts.append(at)
            shifts.append(at + len(heading) - document.text.index(body))  # joined offset - own offset
            pieces.append(heading + body)
            at += len(heading) + len(body) + 2
        text, places = "\n\n".join(pieces), Places(documents, starts, shifts)
    answer = ask(model, text, question, name_of=places.name_of, **options)
    if len(documents) > 1:
        answer.documents = [{"name": d.name, "start": start} for d, start in zip(documents, places.starts)]
    answer.places = [places.of(f.start, len(f.quote)) for f in answer.findings]
    if answer.findings and not answer.text.startswith(NOT_FOUND):
        answer.location = answer.places[0]
        if len(documents) > 1:
            answer.document = answer.location["document"]
    return answer


class Places:
    """Offsets of the text ask() read (one document, or several joined under their headings) as places:
    the document, its location label (a page, heading or chapter), and the offset in its own text."""

    def __init__(self, documents: list[Document], starts: list[int], shifts: list[int]):
        self.documents, self.starts, self.shifts = documents, starts, shifts

    def _index(self, offset: int) -> int:
        return max(i for i, start in enumerate(self.starts) if start <= offset)

    def name_of(self, offset: int) -> str:
        """"report.pdf, p. 12", or the name alone where the document has no location there."""
        place = self.of(offset, 0)
        return f"{place['document']}, {place['location']}" if place["location"] else place["document"]

    def of(self, offset: int, length: int) -> dict:
        i = self._index(offset)
        document, own = self.documents[i], max(offset - self.shifts[i], 0)
        return {"document": document.name, "location": label_at(document.locations, own), "start": own,
                "end": own + length}


def ask(model, text: str, question: str, *, progress=None, keep: bool = True, part_tokens: int | None = None,
        name_of=None, every_part: bool = False) -> Answer:
    """Answer `question` about `text` with `model` (a door: arbor_core.door.Door).

    `progress` (begin(phase, total), advance(): the summariser's progress protocol) follows reading the
    document and its parts; `keep` keeps each text's prefill on disk for the next question;
    `part_tokens` overrides reliable_tokens(model); `name_of(offset)` names the document at a character
    offset of `text` (several documents, ask_documents), and the answer says it beside the quote;
    `every_part` (--all) reads every part for every answer, as a whole-document question does."""
    if not text.strip():
        raise UsageError("there is nothing to ask about: the document is empty")
    if not question.strip():
        raise UsageError("the question is empty")
    limit = reliable_tokens(model) if part_tokens is None else part_tokens
    if limit < 128:
        raise UsageError(f"--part-tokens must be at least 128, got {limit}")
    started = time.perf_counter()
    progress = progress or NoProgress()
    index = index_for(model, text, limit, progress, keep)  # tokens, parts, sentence counts: kept with the cache
    every = every_part or whole_document_question(question)
    if index.tokens <= limit and not every:
        return _one_pass(model, text, question, index.tokens, keep, started, name_of, progress)
    # a whole-document question about a short document reads it as one part
    starts, parts = [a for a, _ in index.parts], index.texts(text)
    terms = QuestionTerms(question, index.counts)
    can = index.naming(text, terms)
    if not every and not can:
        if not terms.terms:  # "What is this document about?": nothing to look for
            model.notify("the question names nothing to look for in the document; for what the whole "
                         "document says, `arbor summarize` it")
        return _nothing_names(text, starts, parts, terms, index.tokens, started, progress)
    # only the parts naming what is asked are read (ask_every_part.py too): about that share of it is kept
    reader = DocumentReader(model, keep_the_cache(model, index.tokens * len(can) // len(parts), len(can), keep))
    if every:
        return _every_part(model, reader, text, starts, parts, question, progress, index.tokens, started, name_of,
                           terms, can)
    scores, held = _read_parts(reader, parts, can, question, progress)
    reader.say_what_was_kept()
    read_s = time.perf_counter() - started
    progress.begin(f"answering from the best of the {len(scores)} parts read", 1)
    answered, findings = _answer_parts(model, reader, text, starts, parts, question, scores, held, terms)
    progress.advance()
    timings = {"total_s": round(time.perf_counter() - started, 3), "read_s": round(read_s, 3)}
    result = Answer(NOT_FOUND, "parts", len(parts), index.tokens, answered, findings,
                    {"loaded": reader.loaded, "prefilled": reader.prefilled}, timings, read=len(can))
    findings.sort(key=finding_rank, reverse=True)  # the answer's own first
    if findings and findings[0].answers:  # a quote that does not carry the question answers nothing
        best = findings[0]
        where = f"{name_of(best.start)}, " if name_of else ""
        result.text = (f"{best.answer} ({where}part {best.part} of {len(parts)}: "
                       f"\u201c{' '.join(best.quote.split())}\u201d)")
    return result


def _nothing_names(text: str, starts: list[int], parts: list[str], terms: QuestionTerms, tokens: int,
                   started: float, progress) -> Answer:
    """No sentence of any part carries what the question names (an absent key, a question about something
    else, or one that names nothing: "What is this document about?"), so no part can give a quote that
    answers and none is read: NOT_FOUND at once, with the sentences nearest the question as the findings
    that do not answer (what the reader may check). Reading every part here took a 16K-token document ~100 s
    on a 2-core CPU (the 135M model) for the same answer."""
    _, part_of = part_places(text, starts, parts)
    progress.begin(f"no part of {len(parts)} names what is asked", 1)
    progress.advance()
    return Answer(NOT_FOUND, "parts", len(parts), tokens, [], nearest(text, terms, part_of),
                  {"loaded": 0, "prefilled": 0}, {"total_s": round(time.perf_counter() - started, 3), "read_s": 0.0},
                  read=0)


def _every_part(model, reader: DocumentReader, text: str, starts: list[int], parts: list[str], question: str,
                progress, tokens: int, started: float, name_of, terms: QuestionTerms, read: list[int]) -> Answer:
    """A whole-document question (ask_every_part.py): every part answers; every answering finding is listed,
    a count first when one was asked; the closest that do not answer follow them in the findings."""
    answered, found, others = read_every_part(model, reader, text, starts, parts, question, progress, terms, read)
    reader.say_what_was_kept()
    text_out = listing(found, len(parts), bool(COUNT.search(question)), name_of) if found else NOT_FOUND
    return Answer(text_out, "every part", len(parts), tokens, answered, found + others,
                  {"loaded": reader.loaded, "prefilled": reader.prefilled},
                  {"total_s": round(time.perf_counter() - started, 3)}, read=len(answered))


def _best_first(scores: dict[int, float]):
    return lambda i: (-scores[i], i)  # ties in document order


def _read_parts(reader: DocumentReader, parts: list[str], read: list[int], question: str, progress
                ) -> tuple[dict[int, float], dict]:
    """The parts numbered `read` (those naming what is asked: no other can give a quote that answers) read
    with the question after it: their scores, and the best-scored readings so far, ready to answer (a model's
    sessions are large: ANSWERED_PARTS of them are kept; an engine's hold ids)."""
    scores, held = {}, {}
    rank = _best_first(scores)
    progress.begin(f"reading the {len(read)} of {len(parts)} parts that name what is asked", len(read))
    for index, reading in zip(read, reader.read_all([parts[i - 1] for i in read], question, progress.advance)):
        scores[index] = reading.score
        held[index] = reading
        if len(held) > ANSWERED_PARTS and reading.session.cache is not None:
            del held[max(held, key=rank)]
    return scores, held


def _answer_parts(model, reader: DocumentReader, text: str, starts: list[int], parts: list[str], question: str,
                  scores: dict[int, float], held: dict, terms: QuestionTerms) -> tuple[list[dict], list[Finding]]:
    """The best-ranked of the parts read (`scores`: those naming what is asked) answer, until ANSWERED_PARTS
    have and one gave evidence; the best part without evidence gets a second look. Unranked (the door does not
    score), every part read answers, at once where the door runs several."""
    document, common = DocumentWords(text), common_words(parts)
    ranked = sorted(scores, key=_best_first(scores))
    # a document that nowhere carries what the question names as one sentence does (an absent key) holds no
    # quote that answers: a second look (the best part read again, uncached: minutes for an 8K part on a 1.5B
    # model on a CPU) could only add a candidate that does not answer
    answerable = terms.support(text).anchored
    findings, answered, replies = [], [], {}
    if not reader.ranked:
        replies = dict(zip(ranked, model.map(lambda i: reader.answer(held[i]).text, ranked)))
    for index in ranked if replies else ranked[:MAX_ANSWERED_PARTS]:
        if len(answered) >= ANSWERED_PARTS and any(f.answers for f in findings) and not replies:
            break
        part, score = parts[index - 1], scores[index]
        offset = text.index(part, starts[index - 1])
        reply = replies.get(index) or reader.answer(held.pop(index, None) or reader.read(part, question)).text
        record = {"part": index, "score": round(score, 3), "reply": reply.strip()}
        found = finding(reply, part, offset, question, index, score, common, document, terms)
        if answerable and not answered and not replies and (found is None or not found.answers):  # a second look
            record["second_look"] = second_look(model, focus(part, question, common, terms), question).text.strip()
            looked = finding(record["second_look"], part, offset, question, index, score, common, document, terms)
            found = max([f for f in (found, looked) if f is not None], key=finding_rank, default=None)
            if (found is None or not found.answers) and (named := named_sentences(part, terms)):  # a last look
                record["last_look"] = second_look(model, named, question).text.strip()
                looked = finding(record["last_look"], part, offset, question, index, score, common, document, terms)
                found = max([f for f in (found, looked) if f is not None], key=finding_rank, default=None)
        answered.append(record)
        if found is not None:
            findings.append(found)
    return answered, findings


def _one_pass(model, text: str, question: str, tokens: int, keep: bool, started: float, name_of=None,
              progress=None) -> Answer:
    """The whole document in one prompt; the answer with its quote when the quote answers, else NOT_FOUND
    (the reply stays in the parts' record, its quote among the findings marked as not answering)."""
    body = text.strip()
    reader, progress = DocumentReader(model, keep), progress or NoProgress()
    progress.begin("reading the document with the question", 1)
    reading = reader.read(body, question)
    progress.advance()
    reader.say_what_was_kept()
    progress.begin("answering", 1)
    reply = reader.answer(reading)
    progress.advance()
    terms = QuestionTerms(question, SentenceCounts(body))
    found = finding(reply.text, body, text.index(body), question, 1, reading.score, terms=terms)
    shown = reply.text.strip()
    if found is not None and found.answers:  # the evidence, for the reader to check
        where = f"{name_of(found.start)}: " if name_of else ""
        shown += f" ({where}\u201c{' '.join(found.quote.split())}\u201d)"
    else:  # no quote that answers: the reply (in --json's parts, its quote if any marked as not answering) is no answer
        shown = NOT_FOUND
    return Answer(shown, "one pass", 1, tokens, [{"part": 1, "score": round(reading.score, 3),
                                                                "reply": reply.text.strip()}], [found] if found else [],
                  {"loaded": reader.loaded, "prefilled": reader.prefilled},
                  {"total_s": round(time.perf_counter() - started, 3), **_prefill_timings(reply)})


def _prefill_timings(reply) -> dict:
    timings = getattr(reply, "timings", None) or {}
    return {k: round(timings[k], 3) for k in ("prompt_tokens", "prefill_s") if k in timings}
