"""Summaries of documents of any length: one pass when the document fits, map-reduce when not.

The context comes from the planner (memory and --context). A document that fits it, with the
prompt and the answer, is summarised in one pass. A longer one is split on paragraph, then
sentence, then word boundaries into token-budgeted chunks that overlap a little (chunking.py,
from the one tokenization of the document); each chunk becomes short notes ("map"), and the notes
are combined into one summary ("reduce"), in groups and again over the groups' results while they
do not fit one context. The prompts and the options that fill them are summary_prompts.py's; every
answer is cleaned by summary_text.py, and the summary is held to --words N (at most N×1.25 words: whole
sentences, then leading clauses; summary_text.fit_words). Out of memory, the whole run is retried once at the next
smaller context bucket (Model.smaller_context decides). Progress is reported through progress.py's
Progress; nothing here prints.

Several documents (summarize_documents): a set that fits one context is read in one pass, each
document under its name; otherwise each document is summarised on its own (as above) and the
summaries, each under its document's name, are combined. With --style bullets and several documents
the answer is one group of bullets per document, then one for the whole set. A --focus instruction
goes into every prompt: the parts' notes, each document's summary and the combination.

A document with a location map (a PDF's pages, headings, chapters: extract/) that is read by parts says
which pages each part covered: --json's `part_locations` gives each part's span of the text and its
location ("pp. 3-7"), and with --style bullets the answer is one group of bullets per part, named by its
pages (its notes), then one for the whole document. A part's span is all the text it read, the overlap
with the part before included, so neighbouring parts can share a page. The paragraph style's prose is
unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from arbor_core.errors import ContextError, OutOfMemoryError, UsageError

from .chunking import Chunk, cutting_progress, default_overlap, document_token_offsets, split_into_chunks
from .documents import Document
from .generate import GenerationOptions
from .extract import Locations, span_label
from .progress import NoProgress, Progress
from .summary_prompts import (
    COMBINE_PROMPT,
    REDUCE_PROMPT,
    SummaryOptions,
    documents_messages,
    map_messages,
    map_prompt_tokens,
    one_pass_messages,
    one_pass_prompt_tokens,
    prompt_tokens,
    reduce_messages,
    reduce_prompt_tokens,
)
from .summary_text import clean_summary, fit_words, shape_summary

MIN_CHUNK_TOKENS = 64
REDUCE_FANOUT = 3          # notes merged by one call; more and a small model drops the early ones
REPEAT_PENALTY = 1.1       # Ollama's and llama.cpp's default: keeps a small model's notes from looping

WHOLE_SET_HEADING = "All documents"
WHOLE_DOCUMENT_HEADING = "Whole document"


# ---- results ----------------------------------------------------------------------------
@dataclass
class Summary:
    text: str
    chunks: int                 # map chunks; 1 for a one-pass summary
    context: int                # the context (tokens) the run was planned for
    rope_scaling: dict | None   # the RoPE scaling at that context; None for the model's own
    timings: dict[str, float] = field(default_factory=dict)
    reduce_rounds: int = 0
    documents: list[dict] = field(default_factory=list)  # several documents: each one's name, tokens and parts
    part_locations: list[dict] = field(default_factory=list)  # read by parts, with a location map: see located_parts
    part_spans: list[tuple[int, int]] = field(default_factory=list, repr=False)  # each part's (start, end) in the text
    part_notes: list[str] = field(default_factory=list, repr=False)  # each part's notes, as the map phase wrote them

    def to_json(self) -> dict:
        out = {"text": self.text, "chunks": self.chunks, "context": self.context,
               "rope_scaling": self.rope_scaling, "timings": self.timings}
        if self.part_locations:
            out["part_locations"] = self.part_locations
        return {**out, "documents": self.documents} if self.documents else out


@dataclass
class GenerationTotals:
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


# ---- the run ------------------------------------------------------------------------------
def summarize(model, text: str, options: SummaryOptions | None = None, progress: Progress | None = None,
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
    progress = progress or NoProgress()
    token_offsets = document_token_offsets(model.tokenizer.encode_with_offsets, text, progress)  # tokenized once
    plan = model.plan(one_pass_prompt_tokens(model, options) + len(token_offsets) + options.answer_tokens)
    try:
        summary = _run(model, text, token_offsets, plan.context, options, progress)
    except OutOfMemoryError as e:
        smaller = model.smaller_context(e, plan.context)  # re-raises e when there is no smaller bucket
        notify(f"{e}; retrying once with a {smaller}-token context (more, smaller chunks)")
        model.plan(smaller, requested=smaller)  # refuses a context that cannot fit either
        summary = _run(model, text, token_offsets, smaller, options, progress)
    summary.timings["total_s"] = round(time.perf_counter() - started, 3)
    return summary


def count_tokens_of(model, text: str) -> int:
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def _run(model, text: str, token_offsets: list[tuple[int, int]], context: int, options: SummaryOptions,
         progress: Progress) -> Summary:
    run = SummaryRun(model, context, options, progress)
    if one_pass_prompt_tokens(model, options) + len(token_offsets) + options.answer_tokens <= context:
        summary_text, chunks = run.one_pass(text), 1
    else:
        run.check_room_to_combine()
        summary_text, chunks = run.map_reduce(text, token_offsets)
    timings = {"split_s": round(run.split_s, 3), "map_s": round(run.map_s, 3), "reduce_s": round(run.reduce_s, 3),
               **run.usage.as_timings()}
    return Summary(summary_text, chunks, context, model.rope_scaling_for(context), timings, run.reduce_rounds,
                   part_spans=run.part_spans, part_notes=run.part_notes)


def located_parts(summary: Summary, locations: Locations) -> list[dict]:
    """Each part of a summary read by parts, with where it lies: part (from 1), start and end (its span of
    the document's text) and location ("pp. 3-7", "§ Methods"; None where the map names no place there).
    Empty for a one-pass summary or a document without a location map."""
    if not locations or len(summary.part_spans) < 2:
        return []
    return [{"part": i, "start": start, "end": end, "location": span_label(locations, start, end)}
            for i, (start, end) in enumerate(summary.part_spans, 1)]


def bullets_by_part(summary: Summary, parts: list[dict]) -> str:
    """--style bullets for a document read by parts: each part's notes as bullets under its location (or
    "part i of n"), then the whole document's summary; a part whose notes came back empty is left out."""
    groups = []
    for part, notes in zip(parts, summary.part_notes):
        if notes.strip():
            heading = part["location"] or f"part {part['part']} of {len(parts)}"
            groups.append(f"{heading}:\n{shape_summary(notes, 'bullets')}")
    return "\n\n".join([*groups, f"{WHOLE_DOCUMENT_HEADING}:\n{summary.text}"])


def summarize_documents(model, documents: list[Document], options: SummaryOptions | None = None,
                        progress: Progress | None = None, notify: Callable[[str], None] | None = None
                        ) -> Summary:
    """One summary of several (name, text) documents; each keeps its name (see the module's docstring)."""
    options = options or SummaryOptions()
    if len(documents) == 1:
        name, text = documents[0]
        summary = summarize(model, text, options, progress, notify)
        summary.documents = [{"name": name, "tokens": count_tokens_of(model, text), "parts": summary.chunks}]
        summary.part_locations = located_parts(summary, _locations_of(documents[0]))
        if summary.part_locations and options.style == "bullets":
            summary.text = bullets_by_part(summary, summary.part_locations)
        return summary
    started = time.perf_counter()
    progress = progress or NoProgress()
    tokens = [count_tokens_of(model, text) for _, text in documents]
    if not any(text.strip() for _, text in documents):
        raise UsageError("there is nothing to summarize: the documents are empty")
    one_pass = prompt_tokens(model, documents_messages(documents, options)) + options.answer_tokens
    plan = model.plan(one_pass)
    one_pass_whole = options.style == "paragraph" and one_pass <= plan.context
    if one_pass_whole:  # the whole set in one pass, names and all
        run = SummaryRun(model, plan.context, options, progress)
        progress.begin("summarizing", 1)
        text = fit_words(shape_summary(run.generate(documents_messages(documents, options), options.answer_tokens),
                                        "paragraph"), options.words)
        progress.advance()
        parts = [1] * len(documents)
        summary = Summary(text, 1, plan.context, model.rope_scaling_for(plan.context), run.usage.as_timings())
    else:  # each document on its own, then their summaries combined under their names
        own = SummaryOptions(max(options.note_words, options.words // 2) if options.style == "bullets"
                             else options.note_words, options.style, options.focus)
        each = [summarize(model, text, own, progress, notify) for _, text in documents]
        parts = [s.chunks for s in each]
        run = SummaryRun(model, plan.context, options, progress, reduce_prompt=COMBINE_PROMPT)
        run.check_room_to_combine()
        notes = [f"{name}: {s.text}" for (name, _), s in zip(documents, each)]
        whole = fit_words(shape_summary(run.reduce(notes), options.style), options.words)
        if options.style == "bullets":
            groups = [f"{name}:\n{s.text}" for (name, _), s in zip(documents, each)]
            whole = "\n\n".join([*groups, f"{WHOLE_SET_HEADING}:\n{whole}"])
        timings = {key: run.usage.as_timings()[key] + sum(s.timings.get(key, 0) for s in each)
                   for key in ("prompt_tokens", "generated_tokens")}  # over every document's run and the combination
        summary = Summary(whole, sum(parts), plan.context, model.rope_scaling_for(plan.context), timings,
                          run.reduce_rounds)
    summary.documents = [{"name": name, "tokens": n, "parts": p} for (name, _), n, p in zip(documents, tokens, parts)]
    if not one_pass_whole:
        for entry, document, alone in zip(summary.documents, documents, each):
            located = located_parts(alone, _locations_of(document))
            if located:
                entry["part_locations"] = located
    summary.timings["total_s"] = round(time.perf_counter() - started, 3)
    return summary


def _locations_of(document) -> Locations:
    return getattr(document, "locations", ())  # a (name, text) pair has none


class SummaryRun:
    """One attempt at one context: the map and reduce phases and what they cost.

    With the user's --context (model.context), every generation runs at this run's context (after
    an out-of-memory retry, the smaller one). Without, Model.chat plans each call itself, never
    beyond this context: every prompt is sized to fit it.
    """

    def __init__(self, model, context: int, options: SummaryOptions, progress: Progress,
                 reduce_prompt: str = REDUCE_PROMPT):
        self.model, self.context, self.options, self.progress = model, context, options, progress
        self.reduce_prompt = reduce_prompt  # COMBINE_PROMPT when the notes are several documents' summaries
        self.generation_context = context if model.context is not None else None
        self.usage = GenerationTotals()
        self.split_s = self.map_s = self.reduce_s = 0.0
        self.reduce_rounds = 0
        self.part_spans: list[tuple[int, int]] = []  # read by parts: each part's span of the text, and its notes
        self.part_notes: list[str] = []

    def generate(self, messages: list[dict], max_new_tokens: int) -> str:
        result = self.model.chat(messages, context=self.generation_context, max_new_tokens=max_new_tokens,
                                 temperature=0.0, repetition_penalty=REPEAT_PENALTY)
        self.usage.add(result.timings)
        return clean_summary(result.text, truncated=result.finish_reason == "length")

    def generate_each(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        """generate() of every prompt, in order, the progress advanced as each ends: one at a time through the
        door's map (an engine's --parallel), or with --batch, decoded together (door.stream_many)."""
        if self.options.batch == 1 or len(prompts) < 2:
            return list(self.model.map(lambda messages: self.generate(messages, max_new_tokens), prompts,
                                       on_done=self.progress.advance))
        options = GenerationOptions.build(max_new_tokens=max_new_tokens, temperature=0.0,
                                          repetition_penalty=REPEAT_PENALTY)
        results = {}
        for event in self.model.stream_many(prompts, options, context=self.generation_context,
                                            parallel=self.options.batch or None):
            if event.result is not None:
                results[event.index] = event.result
                self.usage.add(event.result.timings)
                self.progress.advance()
        return [clean_summary(r.text, truncated=r.finish_reason == "length")
                for r in (results[i] for i in range(len(prompts)))]

    def one_pass(self, text: str) -> str:
        t0 = time.perf_counter()
        self.progress.begin("summarizing", 1)
        answer = self.generate(one_pass_messages(text.strip(), self.options), self.options.answer_tokens)
        self.progress.advance()
        self.reduce_s = time.perf_counter() - t0
        return fit_words(shape_summary(answer, self.options.style), self.options.words)

    def map_reduce(self, text: str, token_offsets: list[tuple[int, int]]) -> tuple[str, int]:
        t0 = time.perf_counter()
        chunks = self.split(text, token_offsets)
        t1 = time.perf_counter()
        self.split_s = t1 - t0
        self.progress.begin(f"reading {len(chunks)} parts", len(chunks))
        notes = self.generate_each([map_messages(chunk.text_of(text), i, len(chunks), self.options)
                                    for i, chunk in enumerate(chunks, 1)], self.options.note_tokens)
        t2 = time.perf_counter()
        self.map_s = t2 - t1
        self.part_spans, self.part_notes = [_stripped_span(text, chunk) for chunk in chunks], notes
        answer = self.reduce([n for n in notes if n])
        self.reduce_s = time.perf_counter() - t2
        return fit_words(shape_summary(answer, self.options.style), self.options.words), len(chunks)

    def split(self, text: str, token_offsets: list[tuple[int, int]]) -> list[Chunk]:
        """Chunks sized so prompt + chunk + notes fit the context; the prompt names "part i of n"."""
        count, first = self._estimated_parts(len(token_offsets)), True
        while True:  # the prompt's size depends on n's digits: settle it (usually the estimate has them)
            budget = self._chunk_budget(count)
            chunks = split_into_chunks(text, token_offsets, lambda s: count_tokens_of(self.model, s), budget,
                                       on_chunk=cutting_progress(text, self.progress))
            digits, guessed = len(str(len(chunks))), len(str(count))
            if digits == guessed or (digits < guessed and not first):  # as if counted up from one part
                return chunks
            count, first = len(chunks), False

    def _chunk_budget(self, count: int) -> int:
        budget = self.context - map_prompt_tokens(self.model, self.options, count) - self.options.note_tokens
        if budget < MIN_CHUNK_TOKENS:
            raise ContextError(f"a {self.context}-token context leaves no room for document text; raise --context")
        return budget

    def _estimated_parts(self, document_tokens: int) -> int:
        """About how many parts the document makes (each part after the first repeats an overlap): a
        split is a pass over the whole document, so guessing n's digits right saves one."""
        budget = self._chunk_budget(1)
        return max(1, -(-document_tokens // max(1, budget - default_overlap(budget))))

    def reduce(self, notes: list[str]) -> str:
        """One summary of `notes`: directly when they are few and fit, else combine consecutive groups
        of at most REDUCE_FANOUT notes and reduce again. A small model asked to merge many notes at
        once keeps the last few and drops the rest; a tree of small merges keeps every subject."""
        words, style = self.options.words, self.options.style
        focus, prompt = self.options.focus_hint, self.reduce_prompt
        room = self.context - reduce_prompt_tokens(self.model, self.options, prompt)
        if len(notes) <= REDUCE_FANOUT and self._notes_tokens(notes) + self.options.answer_tokens <= room:
            self.progress.begin("combining notes", 1)
            self.reduce_rounds += 1
            answer = self.generate(reduce_messages(join_notes(notes), words, style, focus, prompt),
                                   self.options.answer_tokens)
            self.progress.advance()
            return answer
        groups = self.group(notes, room - self.options.note_tokens)
        self.reduce_rounds += 1
        self.progress.begin(f"combining notes (round {self.reduce_rounds}, {len(groups)} groups)", len(groups))
        merged = iter(self.generate_each([reduce_messages(join_notes(group), self.options.note_words, "paragraph",
                                                          focus, prompt) for group in groups if len(group) > 1],
                                         self.options.note_tokens))
        combined = []
        for group in groups:  # a group of one note is that note (its progress step is taken here)
            if len(group) == 1:
                self.progress.advance()
            combined.append(group[0] if len(group) == 1 else next(merged))
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
        room = self.context - reduce_prompt_tokens(self.model, self.options, self.reduce_prompt)
        if min(room - self.options.answer_tokens, room - self.options.note_tokens) < 2 * self.options.note_tokens:
            raise ContextError(f"--words {self.options.words} is too long for a {self.context}-token context "
                               "(the notes on the parts and the answer must fit it); lower --words or raise --context")

    def _notes_tokens(self, notes: list[str]) -> int:
        return count_tokens_of(self.model, join_notes(notes)) if notes else 0


def _stripped_span(text: str, chunk: Chunk) -> tuple[int, int]:
    """The chunk's span without the whitespace at its edges (the part's text as the model read it)."""
    piece = text[chunk.start:chunk.end]
    return chunk.start + len(piece) - len(piece.lstrip()), chunk.end - len(piece) + len(piece.rstrip())


def join_notes(notes: list[str]) -> str:
    return "\n\n".join(notes)
