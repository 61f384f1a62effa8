"""Questions about a document of any length (`arbor ask`), answered in one pass or part by part.

Plain attention stops retrieving long before the context ends: the default model finds a pass key
hidden in real prose 75% of the time at 2K tokens and never from 32K (docs/long-context.md). So:

- a document within `reliable_tokens(model)` is asked in one pass: the document, then the question;
- a longer one is read in parts of that size, like the summariser reads it (chunking.py), and each
  part is asked the question on its own. A small model asked about a part that lacks the answer
  invents one (../shared/design/ask-probe.md: 12 of 13 parts answered a pass key, one rightly), so a
  part's answer is kept only with *evidence*: a run of its words that occurs verbatim in that part's
  text and says more than the question does. The kept findings carry their part and quote, and the
  answer says where in the document it came from.

The document's part of each prompt (the whole document, or a part) is prefilled once and kept on disk
(doc_cache.py): a later question about the same text loads it and prefills only itself (2,562-token
document, default model, CPU: 8.9 s for the first question, 1.1 s for the second, the same answer).

Not done yet (issue 13 stays open): the reliable length is the default model's for every model, and
retrieval is not yet at the issue's bar. Probe (default model, CPU, a pass key in repeated filler at
16K tokens, 4 random depths): 3 of 4 found, the fourth answered "does not seem to say" (no wrong key),
with the passkey eval's own wording in the part prompt; with "Answer in one sentence with the words of
this part" the part holding the key answered "a unique pass key that…" (0 of 1). A part that quotes the
filler back ("the phrase 'The grass is green.'") is no finding: `specific` drops quotes that occur all
over the document. Then 8 trials at 16K (depths (i + 0.5) / 8, 10 parts each, CPU): 7 of 8 found,
the eighth "does not seem to say"; first question 14-24 s, the same question again 7.8-9.2 s (the
parts' caches load from disk, but every part still decodes its answer, and float32 KV makes each
2K-token part's file ~90 MB). Not yet measured: 32K-128K, real prose, real-document questions.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from . import doc_cache
from .chunking import document_token_offsets, split_into_chunks
from .errors import UsageError
from .generate import GenerationOptions

# Where plain attention still retrieves on the default model: passkey in real prose 75% at 2K, in
# repeated filler 100% at 4K (docs/long-context.md); longer documents are asked part by part.
RELIABLE_TOKENS = 4096
PART_TOKENS = 2048  # a part, prompt and answer included: where retrieval in real prose is still 75%
ANSWER_TOKENS = 64
PROMPT_MARGIN_TOKENS = 32
PART_OVERLAP_TOKENS = 200  # a fact cut by a part's edge is whole in the next part
MIN_EVIDENCE_WORDS = 3  # a run of this many words, or one word with a digit in it, is evidence
MAX_QUOTE_REPEATS = 2  # a quote found more often in the document says nothing about where the answer is
SYSTEM_PROMPT = "You answer questions about documents from what the document says."
ONE_PASS_PROMPT = "Read the document below.\n\n---\n{text}\n---\n\n{question}"
PART_PROMPT = ("There is an important piece of information hidden in this text, part {index} of {count} of a "
               "longer document. Find it and memorize it.\n\n{text}\n\n{question}")
NOT_FOUND = "The document does not seem to say."
QUESTION_ROOM = 256  # tokens a question may take after a cached document (the cache's context holds them)
WORDS = re.compile(r"\w+")


@dataclass
class Finding:
    part: int  # 1-based, as the prompt names it
    answer: str
    quote: str  # the evidence, as it is written in the document
    start: int  # the quote's character offset in the document


@dataclass
class Answer:
    text: str
    path: str  # "one pass" or "parts"
    parts: int = 1
    findings: list[Finding] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class _Quiet:
    """Progress that shows nothing (the caller's `progress` hears of parts only)."""

    def begin(self, phase: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


def reliable_tokens(model) -> int:
    """The longest document asked in one pass: RELIABLE_TOKENS, or the trained context if shorter."""
    return min(RELIABLE_TOKENS, model.config.trained_context)


def one_pass_messages(text: str, question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ONE_PASS_PROMPT.format(text=text, question=question)}]


def part_messages(text: str, question: str, index: int, count: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PART_PROMPT.format(text=text, question=question, index=index, count=count)}]


def evidence(answer: str, part: str, question: str) -> tuple[int, int] | None:
    """Where in `part` the longest run of the answer's words occurs verbatim (case and spacing aside),
    if that run is evidence: at least MIN_EVIDENCE_WORDS words, or a word with a digit, and not all
    words the question already holds (an answer that echoes the question proves nothing)."""
    words = WORDS.findall(answer.casefold())
    asked = set(WORDS.findall(question.casefold()))
    spans = [(m.start(), m.end()) for m in WORDS.finditer(part)]
    part_words = [part[a:b].casefold() for a, b in spans]
    best = None
    for i in range(len(words)):  # answers are a sentence: quadratic in its words is nothing
        for j in range(len(words), i, -1):
            run = words[i:j]
            if best is not None and len(run) <= best[1] - best[0]:
                break
            if set(run) <= asked or not (len(run) >= MIN_EVIDENCE_WORDS or any(c.isdigit() for w in run for c in w)):
                continue
            at = next(_runs(part_words, run), None)
            if at is not None:
                best = (at, at + len(run))
                break
    if best is None:
        return None
    return spans[best[0]][0], spans[best[1] - 1][1]


def specific(findings: list[Finding], text: str) -> list[Finding]:
    """The findings whose quote occurs at most MAX_QUOTE_REPEATS times in the whole document: a part that
    lacks the answer may still quote itself ("The pass key is the phrase 'The grass is green.'" in a
    document of repeated filler), but a quote found all over the document tells nothing."""
    words = [w.casefold() for w in WORDS.findall(text)]
    return [f for f in findings if sum(1 for _ in _runs(words, WORDS.findall(f.quote.casefold()))) <= MAX_QUOTE_REPEATS]


def answer_after_document(model, messages: list[dict], without_question: list[dict], context: int | None = None):
    """model.chat(messages), greedy, with the document's part of the prompt (what `messages` shares with
    `without_question`) prefilled once and kept on disk (doc_cache): a later question about the same
    text loads it and prefills only itself. A model without a backend (tests' fakes) just chats."""
    if getattr(model, "lm", None) is None:
        return model.chat(messages, context=context, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
    ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True)
    shared = _common_prefix(ids, model.tokenizer.encode_chat(without_question, add_generation_prompt=True))
    shared = min(shared, len(ids) - 1)  # at least one token of the question is prefilled with the answer
    capacity = context or model.plan(shared + QUESTION_ROOM + ANSWER_TOKENS).context
    if len(ids) + ANSWER_TOKENS > capacity:  # a question longer than QUESTION_ROOM: no cache for it
        return model.chat(messages, context=context, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
    key = doc_cache.key_for(model, ids[:shared], capacity, model.rope_method)
    cache = doc_cache.load(model, key, capacity)
    if cache is None:
        cache = model.new_cache(capacity)
        model.prefill(ids[:shared], cache)
        doc_cache.save(model, key, cache)
    stream = model.stream(ids[shared:], GenerationOptions.build(max_new_tokens=ANSWER_TOKENS), cache=cache)
    for _ in stream:
        pass
    return stream.result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefill_timings(reply) -> dict:
    timings = getattr(reply, "timings", None) or {}
    return {k: timings[k] for k in ("prompt_tokens", "prefill_s", "time_to_first_token_s") if k in timings}


def _runs(haystack: list[str], run: list[str]):
    """The indices where `run` occurs in `haystack`, in order."""
    n = len(run)
    for k in range(len(haystack) - n + 1):
        if haystack[k] == run[0] and haystack[k:k + n] == run:
            yield k

def ask(model, text: str, question: str, *, progress=None) -> Answer:
    """Answer `question` about `text` with `model` (arbor_cli.Model, or anything with its chat surface).

    `progress` (begin(phase, total), advance(): the summariser's progress protocol) follows reading the
    document and asking its parts."""
    if not text.strip():
        raise UsageError("there is nothing to ask about: the document is empty")
    if not question.strip():
        raise UsageError("the question is empty")
    started = time.perf_counter()
    tokenizer = model.tokenizer
    prompt = len(tokenizer.encode_chat(one_pass_messages("", question))) + PROMPT_MARGIN_TOKENS
    progress = progress or _Quiet()
    offsets = document_token_offsets(tokenizer.encode_with_offsets, text, progress)
    limit = reliable_tokens(model)
    if len(offsets) + prompt + ANSWER_TOKENS <= limit:
        reply = answer_after_document(model, one_pass_messages(text, question), one_pass_messages(text, ""))
        return Answer(reply.text.strip(), "one pass", timings={"total_s": round(time.perf_counter() - started, 3),
                                                                 **_prefill_timings(reply)})
    part_limit = min(PART_TOKENS, limit)
    budget = part_limit - prompt - ANSWER_TOKENS - 32  # the part prompt's own words
    chunks = split_into_chunks(text, offsets, lambda s: len(tokenizer.encode(s)), budget,
                               overlap=PART_OVERLAP_TOKENS)
    findings = []
    progress.begin(f"asking {len(chunks)} parts", len(chunks))
    for index, chunk in enumerate(chunks, 1):
        part = chunk.text_of(text)
        reply = answer_after_document(model, part_messages(part, question, index, len(chunks)),
                                      part_messages(part, "", index, len(chunks)), context=part_limit)
        where = evidence(reply.text, part, question)
        if where is not None:
            offset = text.index(part, chunk.start)
            findings.append(Finding(index, reply.text.strip(), part[where[0]:where[1]], offset + where[0]))
        progress.advance()
    findings = specific(findings, text)
    timings = {"total_s": round(time.perf_counter() - started, 3)}
    if not findings:
        return Answer(NOT_FOUND, "parts", len(chunks), [], timings)
    best = max(findings, key=lambda f: len(f.quote))
    return Answer(f"{best.answer} (part {best.part} of {len(chunks)}: \u201c{best.quote}\u201d)", "parts",
                  len(chunks), findings, timings)
