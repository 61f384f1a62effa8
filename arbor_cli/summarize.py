"""Summaries of documents of any length: one pass when the document fits, map-reduce when not.

The context comes from the planner (memory and --context). A document that fits it, with the
prompt and the answer, is summarised in one pass. A longer one is split on paragraph, then
sentence, then word boundaries into token-budgeted chunks that overlap a little; each chunk
becomes short notes ("map"), and the notes are combined into one summary ("reduce"), in groups
and again over the groups' results while they do not fit one context. Out of memory, the whole
run is retried once at the next smaller context bucket. Progress is reported through callbacks;
nothing here prints.
"""

from __future__ import annotations

import bisect
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .errors import ContextError, OutOfMemoryError, UsageError
from .planner import next_smaller

STYLES = ("paragraph", "bullets")
MIN_WORDS, MAX_WORDS = 1, 2000
DEFAULT_WORDS = 150
NOTE_WORDS = 50            # each chunk's notes: short, so the map phase decodes little
TOKENS_PER_WORD = 1.5      # English runs ~1.3 tokens a word; the rest is room for the last sentence
ANSWER_SLACK_TOKENS = 16
PROMPT_MARGIN_TOKENS = 32  # tokenization at the seams of template and text may differ a little
OVERLAP_FRACTION = 0.08    # of a chunk's budget, repeated at the start of the next chunk
MAX_OVERLAP_TOKENS = 256
MIN_PIECE_TOKENS = 16
MIN_CHUNK_TOKENS = 64
REDUCE_FANOUT = 3          # notes merged by one call; more and a small model drops the early ones
REPEAT_PENALTY = 1.1       # Ollama's and llama.cpp's default: keeps a small model's notes from looping

SYSTEM_PROMPT = "You are a careful assistant who writes accurate, concise summaries of documents."
ONE_PASS_PROMPT = ("Read the document below.\n\n---\n{text}\n---\n\n"
                   "Summarize the document above in at most {words} words{style}. "
                   "Name its main subjects and state its key points.")
MAP_PROMPT = ("Here is part {index} of {count} of a longer document.\n\n---\n{text}\n---\n\n"
              "List the key points of this part in at most {words} words. Name the subjects it is about.")
REDUCE_PROMPT = ("Here are notes on the parts of one document, in order.\n\n---\n{text}\n---\n\n"
                 "Write one summary of the whole document in at most {words} words{style}. "
                 "Name its main subjects and state its key points.")
STYLE_HINTS = {"paragraph": ", as one paragraph", "bullets": ", as a list of bullet points, one per line, each starting with '- '"}

PARAGRAPH, SENTENCE, WORD = 2, 1, 0  # the strength of the boundary a span ends on
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_BREAK = re.compile(r"(?<=[.!?;:…。！？])[\"'”’)\]]*\s+|\n\s*")
WORD_BREAK = re.compile(r"\s+")


# ---- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SummaryOptions:
    words: int = DEFAULT_WORDS
    style: str = "paragraph"

    @classmethod
    def build(cls, words: int = DEFAULT_WORDS, style: str = "paragraph") -> "SummaryOptions":
        """Validate user-supplied values; each bad one is a UsageError naming the option."""
        if isinstance(words, bool) or not isinstance(words, int) or not MIN_WORDS <= words <= MAX_WORDS:
            raise UsageError(f"--words must be an integer in {MIN_WORDS}..{MAX_WORDS}, got {words!r}")
        if style not in STYLES:
            raise UsageError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
        return cls(words, style)

    @property
    def note_words(self) -> int:
        return min(self.words, NOTE_WORDS)

    @property
    def answer_tokens(self) -> int:
        return tokens_for_words(self.words)

    @property
    def note_tokens(self) -> int:
        return tokens_for_words(self.note_words)


def tokens_for_words(words: int) -> int:
    """max_new_tokens for an answer of `words` words: enough to finish, short enough to stop a loop."""
    return int(words * TOKENS_PER_WORD) + ANSWER_SLACK_TOKENS


# ---- results and progress -----------------------------------------------------------------
@dataclass
class Summary:
    text: str
    chunks: int                 # map chunks; 1 for a one-pass summary
    context: int                # the context (tokens) the run was planned for
    rope_scaling: dict | None   # the RoPE scaling at that context; None for the model's own
    timings: dict[str, float] = field(default_factory=dict)
    reduce_rounds: int = 0

    def to_json(self) -> dict:
        return {"text": self.text, "chunks": self.chunks, "context": self.context,
                "rope_scaling": self.rope_scaling, "timings": self.timings}


class SummaryProgress(Protocol):
    """What a display implements to follow a run (the CLI draws a progress bar with it)."""

    def begin(self, phase: str, total: int) -> None: ...
    def advance(self) -> None: ...


class _NoProgress:
    def begin(self, phase: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


@dataclass
class _Usage:
    """Token counts and seconds summed over every generation of a run."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    calls: int = 0

    def add(self, timings: dict) -> None:
        self.calls += 1
        self.prompt_tokens += int(timings.get("prompt_tokens", 0))
        self.generated_tokens += int(timings.get("generated_tokens", 0))
        self.prefill_s += float(timings.get("prefill_s", 0.0))
        self.decode_s += float(timings.get("decode_s", 0.0))

    def as_timings(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_tokens_per_s": _rate(self.prompt_tokens, self.prefill_s),
                "decode_tokens_per_s": _rate(self.generated_tokens, self.decode_s)}


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 2) if tokens and seconds > 0 else 0.0


# ---- chunking -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    start: int   # character offsets into the document: text[start:end]
    end: int
    tokens: int
    overlap: int  # characters at the start repeated from the previous chunk

    def text_of(self, document: str) -> str:
        return document[self.start:self.end].strip()


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    boundary: int  # PARAGRAPH, SENTENCE or WORD: what the span ends on
    tokens: int


def split_into_chunks(text: str, count_tokens: Callable[[str], int], budget: int,
                      overlap: int | None = None) -> list[Chunk]:
    """Chunks of at most `budget` tokens each (counted stripped), covering `text` in order.

    Chunks end on a paragraph break when one leaves the chunk at least half full, else on a
    sentence end, else (a sentence longer than a chunk) between words. Each chunk after the first
    begins with up to `overlap` tokens of whole sentences from the end of the one before.
    """
    if budget < MIN_PIECE_TOKENS:
        raise ContextError(f"a chunk budget of {budget} tokens is too small to summarize with; raise --context")
    overlap = default_overlap(budget) if overlap is None else max(0, min(overlap, budget // 2))
    spans = _spans(text, count_tokens, longest=max(MIN_PIECE_TOKENS, budget // 4),
                   piece=max(MIN_PIECE_TOKENS, min(overlap, budget // 4)))
    return _pack(text, spans, count_tokens, budget, overlap)


def default_overlap(budget: int) -> int:
    return min(MAX_OVERLAP_TOKENS, int(budget * OVERLAP_FRACTION))


def _spans(text: str, count_tokens: Callable[[str], int], longest: int, piece: int) -> list[_Span]:
    """The document tiled by sentences (each tagged with its boundary); those over `longest` tokens
    are cut between words into pieces of `piece` tokens, small enough to serve as the overlap."""
    spans = []
    for start, end, boundary in _sentences(text):
        n = count_tokens(text[start:end].strip())
        if n == 0:
            continue
        if n <= longest:
            spans.append(_Span(start, end, boundary, n))
        else:
            spans.extend(_cut_between_words(text, start, end, boundary, count_tokens, piece))
    return spans


def _sentences(text: str):
    """(start, end, boundary) tiling text: sentences, the last of each paragraph tagged PARAGRAPH."""
    paragraph_start = 0
    for brk in list(PARAGRAPH_BREAK.finditer(text)) + [None]:
        paragraph_end = brk.end() if brk else len(text)
        content_end = brk.start() if brk else len(text)
        start = paragraph_start
        for m in SENTENCE_BREAK.finditer(text, paragraph_start, content_end):
            if m.end() < content_end:
                yield start, m.end(), SENTENCE
                start = m.end()
        if start < paragraph_end:
            yield start, paragraph_end, PARAGRAPH
        paragraph_start = paragraph_end


def _cut_between_words(text: str, start: int, end: int, boundary: int, count_tokens, limit: int) -> list[_Span]:
    """Pieces of text[start:end] of at most `limit` tokens, cut after whitespace where there is some."""
    cuts = [m.end() for m in WORD_BREAK.finditer(text, start, end) if start < m.end() < end]
    pieces = []
    while start < end:
        candidates = [c for c in cuts if c > start] + [end]
        piece_end = _longest_fitting(text, start, candidates, count_tokens, limit)
        if piece_end is None:  # not even one word fits: cut inside it, by characters
            piece_end = _longest_fitting(text, start, list(range(start + 1, candidates[0] + 1)), count_tokens, limit)
        tokens = count_tokens(text[start:piece_end].strip())
        pieces.append(_Span(start, piece_end, boundary if piece_end == end else WORD, tokens))
        start = piece_end
    return [p for p in pieces if p.tokens > 0]


def _longest_fitting(text: str, start: int, ends: list[int], count_tokens, limit: int) -> int | None:
    """The largest end in `ends` (ascending) with count_tokens(text[start:end]) <= limit, by bisection."""
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count_tokens(text[start:ends[mid]].strip()) <= limit:
            best, lo = ends[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _pack(text: str, spans: list[_Span], count_tokens, budget: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    first_new = 0        # the first span no chunk has covered yet
    previous_first = 0   # the previous chunk's first new span: overlap never reaches before it
    while first_new < len(spans):
        begin = _overlap_start(spans, first_new, previous_first, overlap) if chunks else first_new
        end = _fill(spans, begin, first_new, budget)
        if end == first_new:  # the overlap leaves no room for the next span: go without it
            begin = first_new
            end = _fill(spans, begin, first_new, budget)
        end = _prefer_boundary(spans, begin, first_new, end, budget)
        chunk_text = text[spans[begin].start:spans[end - 1].end].strip()
        tokens = count_tokens(chunk_text)
        while tokens > budget:  # token counts of neighbours need not add up exactly: shrink to fit
            if end - 1 > first_new:
                end -= 1
            elif begin < first_new:
                begin += 1
            else:
                break  # a single span counted alone already fits; cannot happen with a sane tokenizer
            tokens = count_tokens(text[spans[begin].start:spans[end - 1].end].strip())
        chunks.append(Chunk(spans[begin].start, spans[end - 1].end, tokens,
                            spans[first_new].start - spans[begin].start))
        previous_first, first_new = first_new, end
    return chunks


def _overlap_start(spans: list[_Span], first_new: int, floor: int, overlap: int) -> int:
    begin, used = first_new, 0
    while begin - 1 > floor and used + spans[begin - 1].tokens <= overlap:
        begin -= 1
        used += spans[begin].tokens
    return begin


def _fill(spans: list[_Span], begin: int, first_new: int, budget: int) -> int:
    used = sum(s.tokens for s in spans[begin:first_new])
    end = first_new
    while end < len(spans) and used + spans[end].tokens <= budget:
        used += spans[end].tokens
        end += 1
    return end


def _prefer_boundary(spans: list[_Span], begin: int, first_new: int, end: int, budget: int) -> int:
    """Move the chunk's end back to the strongest boundary that keeps it at least half full."""
    if end >= len(spans):
        return end
    totals = [0]
    for s in spans[begin:end]:
        totals.append(totals[-1] + s.tokens)
    floor = bisect.bisect_left(totals, budget // 2)  # ends before this leave the chunk under half full
    for strength in (PARAGRAPH, SENTENCE):
        for e in range(end, first_new, -1):
            if e - begin < floor:
                break
            if spans[e - 1].boundary >= strength:
                return e
    return end


# ---- the run ------------------------------------------------------------------------------
def summarize(model, text: str, options: SummaryOptions | None = None, progress: SummaryProgress | None = None,
              notify: Callable[[str], None] | None = None) -> Summary:
    """Summarise `text` with `model`; out of memory, retry once at the next smaller context.

    `progress` follows the map and reduce phases; `notify` (default: model.notify) hears about the
    retry. A KeyboardInterrupt propagates: no partial summary is returned as if complete.
    """
    options = options or SummaryOptions()
    notify = notify or getattr(model, "notify", None) or (lambda message: None)
    if not text.strip():
        raise UsageError("there is nothing to summarize: the text is empty")
    started = time.perf_counter()
    document_tokens = count_tokens_of(model, text.strip())
    plan = model.plan(one_pass_prompt_tokens(model, options) + document_tokens + options.answer_tokens)
    try:
        summary = _run(model, text, document_tokens, plan.context, options, progress or _NoProgress())
    except OutOfMemoryError as e:
        smaller = next_smaller(plan.context)
        if smaller is None:
            raise
        notify(f"{e}; retrying once with a {smaller}-token context (more, smaller chunks)")
        model.plan(smaller, requested=smaller)  # refuses a context that cannot fit either
        summary = _run(model, text, document_tokens, smaller, options, progress or _NoProgress())
    summary.timings["total_s"] = round(time.perf_counter() - started, 3)
    return summary


def count_tokens_of(model, text: str) -> int:
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def _run(model, text: str, document_tokens: int, context: int, options: SummaryOptions,
         progress: SummaryProgress) -> Summary:
    run = _Run(model, context, options, progress)
    with _context_pinned(model, context):
        if one_pass_prompt_tokens(model, options) + document_tokens + options.answer_tokens <= context:
            summary_text, chunks = run.one_pass(text), 1
        else:
            run.check_room_to_combine()
            summary_text, chunks = run.map_reduce(text)
    timings = {"split_s": round(run.split_s, 3), "map_s": round(run.map_s, 3), "reduce_s": round(run.reduce_s, 3),
               **run.usage.as_timings()}
    return Summary(summary_text, chunks, context, model.rope_scaling_for(context), timings, run.reduce_rounds)


class _context_pinned:
    """While a run lasts, a user-set model.context follows the run's context (after an OOM retry, the
    smaller one), so every generation sizes its cache within it. Unset, Model.chat plans each call
    itself, and the buckets it picks are never larger than the run's (each prompt fits the run's)."""

    def __init__(self, model, context: int):
        self.model, self.context, self.saved = model, context, model.context

    def __enter__(self):
        if self.saved is not None:
            self.model.context = self.context
        return self

    def __exit__(self, *exc):
        self.model.context = self.saved
        return False


def one_pass_prompt_tokens(model, options: SummaryOptions) -> int:
    return _prompt_tokens(model, one_pass_messages("", options))


def map_prompt_tokens(model, options: SummaryOptions, count: int) -> int:
    return _prompt_tokens(model, map_messages("", count, count, options))


def reduce_prompt_tokens(model, options: SummaryOptions) -> int:
    return _prompt_tokens(model, reduce_messages("", options.words, options.style))


def _prompt_tokens(model, messages: list[dict]) -> int:
    return len(model.tokenizer.encode_chat(messages, add_generation_prompt=True)) + PROMPT_MARGIN_TOKENS


def one_pass_messages(text: str, options: SummaryOptions) -> list[dict]:
    prompt = ONE_PASS_PROMPT.format(text=text, words=options.words, style=STYLE_HINTS[options.style])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def map_messages(text: str, index: int, count: int, options: SummaryOptions) -> list[dict]:
    prompt = MAP_PROMPT.format(text=text, index=index, count=count, words=options.note_words)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def reduce_messages(notes: str, words: int, style: str) -> list[dict]:
    prompt = REDUCE_PROMPT.format(text=notes, words=words, style=STYLE_HINTS[style])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


class _Run:
    """One attempt at one context: the map and reduce phases and what they cost."""

    def __init__(self, model, context: int, options: SummaryOptions, progress: SummaryProgress):
        self.model, self.context, self.options, self.progress = model, context, options, progress
        self.usage = _Usage()
        self.split_s = self.map_s = self.reduce_s = 0.0
        self.reduce_rounds = 0

    def generate(self, messages: list[dict], max_new_tokens: int) -> str:
        result = self.model.chat(messages, max_new_tokens=max_new_tokens, temperature=0.0,
                                 repetition_penalty=REPEAT_PENALTY)
        self.usage.add(result.timings)
        return clean_summary(result.text, truncated=result.finish_reason == "length")

    def one_pass(self, text: str) -> str:
        t0 = time.perf_counter()
        self.progress.begin("summarizing", 1)
        answer = self.generate(one_pass_messages(text.strip(), self.options), self.options.answer_tokens)
        self.progress.advance()
        self.reduce_s = time.perf_counter() - t0
        return shape_summary(answer, self.options.style)

    def map_reduce(self, text: str) -> tuple[str, int]:
        t0 = time.perf_counter()
        chunks = self.split(text)
        t1 = time.perf_counter()
        self.split_s = t1 - t0
        self.progress.begin(f"reading {len(chunks)} parts", len(chunks))
        notes = []
        for i, chunk in enumerate(chunks, 1):
            notes.append(self.generate(map_messages(chunk.text_of(text), i, len(chunks), self.options),
                                       self.options.note_tokens))
            self.progress.advance()
        t2 = time.perf_counter()
        self.map_s = t2 - t1
        answer = self.reduce([n for n in notes if n])
        self.reduce_s = time.perf_counter() - t2
        return shape_summary(answer, self.options.style), len(chunks)

    def split(self, text: str) -> list[Chunk]:
        """Chunks sized so prompt + chunk + notes fit the context; the prompt names "part i of n"."""
        count = 1
        while True:  # the prompt's size depends on n's digits: settle it (at most a couple of rounds)
            budget = self.context - map_prompt_tokens(self.model, self.options, count) - self.options.note_tokens
            if budget < MIN_CHUNK_TOKENS:
                raise ContextError(f"a {self.context}-token context leaves no room for document text; "
                                   "raise --context")
            chunks = split_into_chunks(text, lambda s: count_tokens_of(self.model, s), budget)
            if len(str(len(chunks))) <= len(str(count)):
                return chunks
            count = len(chunks)

    def reduce(self, notes: list[str]) -> str:
        """One summary of `notes`: directly when they are few and fit, else combine consecutive groups
        of at most REDUCE_FANOUT notes and reduce again. A small model asked to merge many notes at
        once keeps the last few and drops the rest; a tree of small merges keeps every subject."""
        words, style = self.options.words, self.options.style
        room = self.context - reduce_prompt_tokens(self.model, self.options)
        if len(notes) <= REDUCE_FANOUT and self._notes_tokens(notes) + self.options.answer_tokens <= room:
            self.progress.begin("combining notes", 1)
            self.reduce_rounds += 1
            answer = self.generate(reduce_messages(join_notes(notes), words, style), self.options.answer_tokens)
            self.progress.advance()
            return answer
        groups = self.group(notes, room - self.options.note_tokens)
        self.reduce_rounds += 1
        self.progress.begin(f"combining notes (round {self.reduce_rounds}, {len(groups)} groups)", len(groups))
        combined = []
        for group in groups:
            if len(group) == 1:
                combined.append(group[0])
            else:
                combined.append(self.generate(reduce_messages(join_notes(group), self.options.note_words,
                                                              "paragraph"), self.options.note_tokens))
            self.progress.advance()
        return self.reduce([c for c in combined if c])

    def group(self, notes: list[str], budget: int) -> list[list[str]]:
        """Consecutive notes in balanced groups of at most REDUCE_FANOUT that fit `budget` tokens each:
        any two notes fit, so each round shrinks the list."""
        sizes = [count_tokens_of(self.model, note) + 2 for note in notes]
        count = -(-len(notes) // REDUCE_FANOUT)
        while True:
            # balanced: 10 notes make groups of 3, 3, 2, 2, never 3, 3, 3, 1
            quotas = [len(notes) // count + (i < len(notes) % count) for i in range(count)]
            groups, current, used = [], [], 0
            for note, size in zip(notes, sizes):
                if current and (len(current) == quotas[min(len(groups), count - 1)] or used + size > budget):
                    groups.append(current)
                    current, used = [], 0
                current.append(note)
                used += size
            groups.append(current)
            if len(groups) <= count or count >= len(notes):
                break
            count = len(groups)
        if len(groups) >= len(notes):
            raise ContextError(f"--words {self.options.words} leaves too little of a {self.context}-token context "
                               "to combine the notes; lower --words or raise --context")
        return groups

    def check_room_to_combine(self) -> None:
        room = self.context - reduce_prompt_tokens(self.model, self.options)
        if min(room - self.options.answer_tokens, room - self.options.note_tokens) < 2 * self.options.note_tokens:
            raise ContextError(f"--words {self.options.words} is too long for a {self.context}-token context "
                               "(the notes on the parts and the answer must fit it); lower --words or raise --context")

    def _notes_tokens(self, notes: list[str]) -> int:
        return count_tokens_of(self.model, join_notes(notes)) if notes else 0


def join_notes(notes: list[str]) -> str:
    return "\n\n".join(notes)


# ---- cleaning the model's answer ----------------------------------------------------------
TEMPLATE_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>|\[/?INST\]")
ROLE_LINE = re.compile(r"^\s*(assistant|user|system)\s*:?\s*$", re.IGNORECASE)
PREAMBLE = re.compile(r"^\s*(sure|certainly|of course|okay|ok)\b[^\n]*?[.!:]\s*\n?|"
                      r"^\s*(here\s+(is|are)|below\s+(is|are))\b[^\n]*?:\s*\n?", re.IGNORECASE)
HEADING = re.compile(r"^\s*(#+\s*)?\**\s*(summary|key points|notes)\s*\**\s*:?\s*\**\s*(\n|$)", re.IGNORECASE)
LABEL = re.compile(r"^\s*\**(summary|key points)\**\s*:\s*", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*•·+]|\d+[.)])\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")


def clean_summary(text: str, truncated: bool = False) -> str:
    """The answer without template tokens, role lines, preambles, repeats, or (when generation hit
    its token limit) a trailing unfinished sentence."""
    text = TEMPLATE_TOKEN.sub("", text)
    lines = [line.rstrip() for line in text.strip().splitlines() if not ROLE_LINE.match(line)]
    text = "\n".join(lines).strip()
    text = PREAMBLE.sub("", text, count=1).strip()
    text = HEADING.sub("", text, count=1).strip()
    text = LABEL.sub("", text, count=1).strip()
    text = drop_repeats(text)
    if truncated:
        text = drop_unfinished_sentence(text)
    return text.strip()


def drop_repeats(text: str) -> str:
    """Stop at the first line or sentence that repeats an earlier one: a small model's greedy loop."""
    seen: set[str] = set()
    kept_lines = []
    for line in text.splitlines():
        kept_sentences = []
        for sentence in SENTENCE_END.split(line):
            key = re.sub(r"\W+", " ", BULLET.sub("", sentence)).strip().lower()
            if key and key in seen:
                return "\n".join(kept_lines + ([" ".join(kept_sentences)] if kept_sentences else [])).strip()
            if key:
                seen.add(key)
            kept_sentences.append(sentence)
        kept_lines.append(" ".join(kept_sentences))
    return "\n".join(kept_lines)


def drop_unfinished_sentence(text: str) -> str:
    """Generation stopped at its token limit: drop the last list item or sentence if it is cut off."""
    text = text.rstrip()
    if re.search(r"[.!?][\"'”’)\]]*$", text):
        return text
    lines = text.splitlines()
    if len(lines) > 1 and BULLET.match(lines[-1]):
        return "\n".join(lines[:-1])
    ends = [m.end() for m in re.finditer(r"[.!?][\"'”’)\]]*(?=\s)", text)]
    return text[:ends[-1]] if ends else text


def shape_summary(text: str, style: str) -> str:
    """Bullets: one '- ' item per line. Paragraph: one paragraph, list markers dropped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if style == "bullets":
        if not any(BULLET.match(line) for line in lines):
            lines = [s.strip() for s in SENTENCE_END.split(" ".join(lines)) if s.strip()]
        return "\n".join("- " + BULLET.sub("", line) for line in lines)
    return " ".join(BULLET.sub("", line) for line in lines)
