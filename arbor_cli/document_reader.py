"""Reading a document's texts with a question after them, on any door (`arbor ask`'s reader): each text's
part of the prompt prefilled once and kept on disk (doc_cache.py), the question scored after it (query
likelihood ranks the parts), the answer read greedily after that. ask.py decides what is read and what
the answers are worth; the prompts and why they are these: its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arbor_core.errors import ScoringUnavailableError, UsageError

from . import doc_cache
from .session import common_prefix

ANSWER_TOKENS = 32  # an answer in the text's own words is a sentence; it also ends at a blank line
QUESTION_ROOM = 256  # tokens a question (with the instruction after it) may take after a cached document
INSTRUCTION = "Answer the question with the exact words of the text, copied from the text above."
PROMPT = "Text:\n{text}\n\nQuestion: {question}\n" + INSTRUCTION
SECOND_LOOK_PROMPT = "Question: {question}\n\nText:\n{text}\n\n" + INSTRUCTION + " Question: {question}"


@dataclass
class Reading:
    """One text read with the question after it: ready to answer from the prompt's last token."""

    score: float
    session: Any  # holds the prompt but its last token (on an engine, only its ids)
    messages: list[dict]  # the whole prompt


def messages(text: str, question: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(text=text, question=question)}]


def second_look_messages(text: str, question: str) -> list[dict]:
    return [{"role": "user", "content": SECOND_LOOK_PROMPT.format(text=text, question=question)}]


class DocumentReader:
    """Reads texts of one document with a question after them, on any door: each text's part of the prompt
    is held by a Session (its prefill kept on disk when `keep`: doc_cache), the question scored after it
    (query likelihood). Counts how many texts came from disk and how many were prefilled here. A door
    that does not score prompts (an engine without echo + logprobs) leaves the parts unranked (`ranked`
    False): then every part answers and the quotes decide."""

    def __init__(self, model, keep: bool = True):
        self.model, self.ranked = model, True
        self.cached_here = model.kv_bytes_per_token() is not None  # an engine keeps its own caches
        self.keep = keep and self.cached_here
        self.loaded = self.prefilled = 0
        self.kept_bytes = 0  # written to the disk cache by this reader
        self.entries: set[str] = set()  # the doc-cache entries of this document: kept while it is read

    def read(self, text: str, question: str) -> Reading:
        """The text's prefill (from disk, or run and kept), then the rest of the prompt but its last token,
        the question's tokens scored: their log-probability after the text (all but the first, which
        follows the same "Question:" in every part)."""
        ids, shared, end = prompt_ids(self.model.tokenizer, text, question)
        session = self.session_for(ids[:shared], shared + QUESTION_ROOM + ANSWER_TOKENS)
        score = 0.0
        if self.ranked:
            try:
                score = sum(self.model.score_prompt(ids[shared:-1], session)[:max(end - shared - 1, 0)])
            except ScoringUnavailableError as e:
                self.ranked = False
                self.model.notify(f"{e}: every part answers, unranked")
        return Reading(score, session, messages(text, question))

    def read_all(self, texts: list[str], question: str, on_done=lambda: None):
        """Each text read, in order, as many at once as the door runs (one at a time here: a part's cache
        is made only when the previous reading was taken)."""
        first = self.read(texts[0], question)  # finds out once whether the door scores prompts
        on_done()
        yield first
        yield from self.model.map(lambda text: self.read(text, question), texts[1:], on_done)

    def session_for(self, doc_ids: list[int], capacity: int):
        """A Session of `capacity` holding `doc_ids` (a text's part of a prompt): loaded from disk, or prefilled
        and kept (ask's parts, and extract's: extract_records.py)."""
        model = self.model
        session = model.session(capacity)
        key = doc_cache.key_for(model, doc_ids, capacity, model.rope_method) if self.keep else None
        cache = doc_cache.load(model, key, capacity) if self.keep else None
        if key is not None:
            self.entries.add(doc_cache.entry_name(key))
        if cache is not None:
            self.loaded += 1
            session.adopt(cache, doc_ids)
            return session
        model.prefill(doc_ids, session)
        self.prefilled += self.cached_here
        if session.cache is None:  # a door that holds no cache here
            return session
        # the document as it is kept (16 bits), kept on disk or not: this question reads what later ones load.
        # Neither kept nor narrowed (a 16-bit or int8 cache read with --no-cache): nothing to export.
        cache, arrays = doc_cache.as_kept(model, session.cache, session.rope) \
            if self.keep or doc_cache.narrows(model) else (session.cache, None)
        if cache is not session.cache:
            session.adopt(cache, doc_ids)
        if self.keep and not doc_cache.save(model, key, cache, in_use=self.entries, arrays=arrays):
            self.keep = False  # one warning said why; the other parts are not tried (a full disk stays full)
        elif self.keep:
            self.kept_bytes += doc_cache.entry_bytes(key)
        return session

    def say_what_was_kept(self) -> None:
        """One line on stderr when this reading wrote to the disk cache: how much, and what manages it."""
        if self.kept_bytes:
            self.model.notify(f"kept {_size(self.kept_bytes)} of this document's reading on disk for later "
                              f"questions (`arbor cache ls` lists it, `arbor cache clear` frees it)")

    def answer(self, reading: Reading):
        """Greedy answer after a reading (its session then holds the answer too)."""
        return self.model.chat(reading.messages, session=reading.session, continuing=True,
                               max_new_tokens=ANSWER_TOKENS, temperature=0.0, stop="\n\n")


def prompt_ids(tokenizer, text: str, question: str) -> tuple[list[int], int, int]:
    """The prompt's ids; where the text's prefix (the same for every question) ends, and where the
    question ends: the question's tokens are ids[shared:end]."""
    ids = tokenizer.encode_chat(messages(text, question), add_generation_prompt=True)
    without = tokenizer.encode_chat(messages(text, ""), add_generation_prompt=True)
    shared = min(common_prefix(ids, without), len(ids) - 2)  # the prompt's last token starts the answer
    if len(ids) - shared > QUESTION_ROOM:
        raise UsageError(f"the question is too long ({len(ids) - shared} tokens with the instruction; "
                         f"at most {QUESTION_ROOM})")
    end = len(ids) - common_prefix(ids[::-1][:len(ids) - shared], without[::-1])
    return ids, shared, end


def second_look(model, text: str, question: str):
    """The text read again with the question before it (no cache: the question starts the prompt)."""
    look = second_look_messages(text, question)
    room = len(model.tokenizer.encode_chat(look, add_generation_prompt=True)) + ANSWER_TOKENS
    return model.chat(look, context=room, max_new_tokens=ANSWER_TOKENS, temperature=0.0, stop="\n\n")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def keep_the_cache(model, tokens: int, parts: int, keep: bool) -> bool:
    """Whether the document's prefill fits the disk cache's cap; says so when it does not."""
    per_token = doc_cache.kept_bytes_per_token(model)
    if not keep or per_token is None:  # None: an engine, which keeps its own caches
        return False
    need = (tokens + parts * 64) * per_token  # the prompt's own words: ~64 tokens a part
    if need > doc_cache.cap_bytes():
        model.notify(f"the document's cache would take {need / 1e9:.1f} GB, more than the "
                     f"{doc_cache.cap_bytes() / 1e9:.1f} GB kept (ARBOR_DOC_CACHE_MB): not kept")
        return False
    return True


NEUTRAL_TEXT = "This sentence says nothing in particular."


class QuoteJudge:
    """The model's own judgement of quotes for one question: how much more expected the question is after a
    quote alone than after NEUTRAL_TEXT (`lift`: mean nats a token over the question's tokens but the first,
    in ask's prompt). A quote about what is asked makes the question's words expected, one about another key
    less; but the ranges overlap across questions (docs/long-context.md), so ask_every_part uses it to pick,
    never as a verdict. None where the door cannot score prompts."""

    def __init__(self, model, question: str):
        self.model, self.question = model, question
        self.baseline: float | None = None
        self.able = True

    def lift(self, quote: str) -> float | None:
        if not self.able:
            return None
        try:
            if self.baseline is None:
                self.baseline = question_score(self.model, NEUTRAL_TEXT, self.question)
            return question_score(self.model, quote, self.question) - self.baseline
        except ScoringUnavailableError:
            self.able = False
            return None


def question_score(model, text: str, question: str) -> float:
    """Mean log p of the question's tokens (all but the first) after `text` alone."""
    ids, shared, end = prompt_ids(model.tokenizer, text, question)
    scored = model.score_prompt(ids[:end])[shared:end - 1]  # scored[i] is log p(ids[i + 1])
    return sum(scored) / max(len(scored), 1)
