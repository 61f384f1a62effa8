"""Text → parts: a document cut on paragraph, then sentence, then word boundaries into chunks of at
most a token budget each, every chunk after the first starting with a little of the one before.

Pure: the caller tokenizes the document once and passes where its tokens are (`token_offsets`);
every span's size is read off those offsets, so finding the boundaries does not tokenize the text
again (only a span's first word, see TokenPositions.alone). Each chunk's own text is then counted
once exactly (`count_tokens`): the budget is a hard limit.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from arbor_core.errors import ContextError

TOKENIZE_BLOCK_CHARS = 1 << 20  # about a second of tokenizing per block: progress moves at least that often
OVERLAP_FRACTION = 0.08    # of a chunk's budget, repeated at the start of the next chunk
MAX_OVERLAP_TOKENS = 256
MIN_PIECE_TOKENS = 16
RECOUNT_MARGIN = 16        # tokens: shrinking a chunk counts it exactly again only this close to its budget

PARAGRAPH, SENTENCE, WORD = 2, 1, 0  # the strength of the boundary a span ends on
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_BREAK = re.compile(r"(?<=[.!?;:…。！？])[\"'”’)\]]*\s+|\n\s*")
WORD_BREAK = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    start: int   # character offsets into the document: text[start:end]
    end: int
    tokens: int
    overlap: int  # characters at the start repeated from the previous chunk

    def text_of(self, document: str) -> str:
        return document[self.start:self.end].strip()


@dataclass(frozen=True)
class Span:
    """A stretch of the document that is never cut: a sentence, or a piece of a sentence too long."""

    start: int
    end: int
    boundary: int  # PARAGRAPH, SENTENCE or WORD: what the span ends on
    tokens: int


class TokenPositions:
    """Where each of the document's tokens begins, to count the tokens of any stretch of it.

    A token belongs to the stretch its first visible character is in (" world" to the word, not the
    space before it); a token of only whitespace, to where it starts.
    """

    def __init__(self, text: str, token_offsets: Sequence[tuple[int, int]], count_tokens: Callable[[str], int]):
        self.text, self.count_tokens = text, count_tokens
        self.starts = sorted(_first_visible(text, start, end) for start, end in token_offsets)
        self._first_words: dict[str, int] = {}  # a first word -> its tokens counted alone

    def in_document(self, start: int, end: int) -> int:
        """Tokens of text[start:end].strip(), as the document's tokenization cuts them."""
        start, end = _stripped(self.text, start, end)
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start) if start < end else 0

    def alone(self, start: int, end: int) -> int:
        """Tokens of text[start:end].strip() tokenized by itself. For tokenizers that cut text at spaces
        first (byte-level BPE, sentencepiece), that differs from in_document only in its first word,
        which alone lacks the space before it (for the 135M model " Chess" is one token, "Chess"
        two); so that word is counted alone, once per distinct word."""
        start, end = _stripped(self.text, start, end)
        if start == end or (start > 0 and not self.text[start - 1].isspace()):  # inside a word: no space lost
            return self.in_document(start, end)
        space = WORD_BREAK.search(self.text, start, end)
        word_end = space.start() if space else end
        word = self.text[start:word_end]
        if word not in self._first_words:
            self._first_words[word] = self.count_tokens(word)
        return self.in_document(start, end) - self.in_document(start, word_end) + self._first_words[word]

    def starting_in(self, start: int, end: int) -> int:
        """Tokens that begin in text[start:end], whitespace-only ones included."""
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def after(self, start: int, count: int) -> int:
        """Where the token `count` tokens after the first one at or after `start` begins (the text's
        end when there is none)."""
        index = bisect.bisect_left(self.starts, _skip_space(self.text, start, len(self.text))) + count
        return self.starts[index] if index < len(self.starts) else len(self.text)


def tokenize_in_blocks(encode_with_offsets: Callable[[str], tuple[list[int], list[tuple[int, int]]]], text: str,
                       on_block: Callable[[int, int], None] = lambda done, total: None,
                       block_chars: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) of each token of `text`, tokenized in blocks of about TOKENIZE_BLOCK_CHARS so
    a long document reports progress (`on_block(blocks done, blocks)`, first with 0 done) and a slow tokenizer's cost
    stays linear. Blocks end just before a paragraph break (else before any whitespace, else
    anywhere): a tokenizer splits words at whitespace first, so the tokens are those of the whole
    text tokenized at once (tests/test_chunking.py checks it on the 135M model's tokenizer)."""
    cuts = block_cuts(text, block_chars or TOKENIZE_BLOCK_CHARS)
    offsets: list[tuple[int, int]] = []
    on_block(0, len(cuts) + 1)
    for i, (start, end) in enumerate(zip([0, *cuts], [*cuts, len(text)]), 1):
        _, block = encode_with_offsets(text[start:end])
        offsets.extend((a + start, b + start) for a, b in block)
        on_block(i, len(cuts) + 1)
    return offsets


def document_token_offsets(encode_with_offsets, text: str, progress) -> list[tuple[int, int]]:
    """(start, end) in `text` of each token of text.strip(), tokenized in blocks; a long document
    (is_long) shows reading it as a phase of `progress` (begin(phase, total), advance())."""
    lead = len(text) - len(text.lstrip())

    def on_block(done: int, total: int) -> None:
        if total > 1 and done == 0:
            progress.begin("reading the document", total)
        elif total > 1:
            progress.advance()

    return [(a + lead, b + lead) for a, b in tokenize_in_blocks(encode_with_offsets, text.strip(), on_block)]


def cutting_progress(text: str, progress) -> Callable[["Chunk"], None]:
    """split_into_chunks' on_chunk for a long document (is_long): cutting it into parts as a phase of
    `progress`, in percent of the text; for a short one, nothing."""
    if not is_long(text):
        return lambda chunk: None
    progress.begin("cutting the document into parts (%)", 100)
    shown = [0]

    def on_chunk(chunk: Chunk) -> None:
        while shown[0] < chunk.end * 100 // len(text):
            shown[0] += 1
            progress.advance()

    return on_chunk


def is_long(text: str) -> bool:
    """More than one tokenizing block: long enough for its reading and cutting to show progress."""
    return len(text) > TOKENIZE_BLOCK_CHARS


def block_cuts(text: str, size: int) -> list[int]:
    """Where tokenize_in_blocks cuts `text`: each cut at most `size` characters after the one before."""
    cuts, start = [], 0
    while len(text) - start > size:
        window = text[start:start + size]
        cut = _last_start(PARAGRAPH_BREAK, window) or _last_start(WORD_BREAK, window) or size
        start += cut
        cuts.append(start)
    return cuts


def _last_start(pattern: re.Pattern, window: str) -> int:
    """The start of the last match of `pattern` in `window` after its first character; 0 if none."""
    last = 0
    for match in pattern.finditer(window, 1):
        last = match.start()
    return last


def split_into_chunks(text: str, token_offsets: Sequence[tuple[int, int]], count_tokens: Callable[[str], int],
                      budget: int, overlap: int | None = None,
                      on_chunk: Callable[[Chunk], None] = lambda chunk: None) -> list[Chunk]:
    """Chunks of at most `budget` tokens each (counted stripped), covering `text` in order.

    `token_offsets` are the (start, end) characters of each token of `text`, from tokenizing it
    once. Chunks end on a paragraph break when one leaves the chunk at least half full, else on a
    sentence end, else (a sentence longer than a chunk) between words. Each chunk after the first
    begins with up to `overlap` tokens of whole sentences from the end of the one before.
    `on_chunk` hears of each chunk as it is made (progress through a long document).
    """
    if budget < MIN_PIECE_TOKENS:
        raise ContextError(f"a chunk budget of {budget} tokens is too small to summarize with; raise --context")
    overlap = default_overlap(budget) if overlap is None else max(0, min(overlap, budget // 2))
    tokens = TokenPositions(text, token_offsets, count_tokens)
    spans = _spans(tokens, longest=max(MIN_PIECE_TOKENS, budget // 4),
                   piece=max(MIN_PIECE_TOKENS, min(overlap, budget // 4)))
    return _pack(tokens, spans, budget, overlap, on_chunk)


def default_overlap(budget: int) -> int:
    return min(MAX_OVERLAP_TOKENS, int(budget * OVERLAP_FRACTION))


def _spans(tokens: TokenPositions, longest: int, piece: int) -> list[Span]:
    """The document tiled by sentences (each tagged with its boundary); those over `longest` tokens
    are cut between words into pieces of `piece` tokens, small enough to serve as the overlap."""
    spans = []
    for start, end, boundary in _sentences(tokens.text):
        if not _has_text(tokens.text, start, end):
            continue
        n = tokens.alone(start, end)
        if n <= longest:
            spans.append(Span(start, end, boundary, n))
        else:
            spans.extend(_cut_between_words(tokens, start, end, boundary, piece))
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


def _cut_between_words(tokens: TokenPositions, start: int, end: int, boundary: int, limit: int) -> list[Span]:
    """Pieces of text[start:end] of at most `limit` tokens, cut after whitespace where there is some,
    else inside a word where a token begins."""
    text = tokens.text
    cuts = [m.end() for m in WORD_BREAK.finditer(text, start, end) if start < m.end() < end] + [end]
    pieces = []
    while start < end:
        first = bisect.bisect_right(cuts, start)  # cuts[first:] lie after start
        fitting = bisect.bisect_right(cuts, limit, lo=first, key=lambda cut: tokens.alone(start, cut)) - 1
        if fitting >= first:
            piece_end = cuts[fitting]
        else:  # not even one word fits: cut inside it, before its (limit + 1)-th token
            piece_end = min(max(tokens.after(start, limit), start + 1), cuts[first])
        pieces.append(Span(start, piece_end, boundary if piece_end == end else WORD, tokens.alone(start, piece_end)))
        start = piece_end
    return [p for p in pieces if _has_text(text, p.start, p.end)]


def _pack(tokens: TokenPositions, spans: list[Span], budget: int, overlap: int, on_chunk) -> list[Chunk]:
    text, count_tokens = tokens.text, tokens.count_tokens
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
        count = count_tokens(text[spans[begin].start:spans[end - 1].end].strip())
        while count > budget:  # alone, the chunk tokenizes a little differently: shrink to fit
            if end - 1 > first_new:
                end -= 1
                dropped = tokens.starting_in(spans[end - 1].end, spans[end].end)
            elif begin < first_new:
                begin += 1
                dropped = tokens.starting_in(spans[begin - 1].start, spans[begin].start)
            else:
                break  # a single span counted alone already fits; cannot happen with a sane tokenizer
            # far over budget, the next step is certain without counting again (the document's own
            # tokens of the dropped span differ from a recount by a token or two at its seams)
            estimate = count - dropped
            count = estimate if estimate > budget + RECOUNT_MARGIN else count_tokens(
                text[spans[begin].start:spans[end - 1].end].strip())
        chunks.append(Chunk(spans[begin].start, spans[end - 1].end, count,
                            spans[first_new].start - spans[begin].start))
        on_chunk(chunks[-1])
        previous_first, first_new = first_new, end
    return chunks


def _overlap_start(spans: list[Span], first_new: int, floor: int, overlap: int) -> int:
    begin, used = first_new, 0
    while begin - 1 > floor and used + spans[begin - 1].tokens <= overlap:
        begin -= 1
        used += spans[begin].tokens
    return begin


def _fill(spans: list[Span], begin: int, first_new: int, budget: int) -> int:
    used = sum(s.tokens for s in spans[begin:first_new])
    end = first_new
    while end < len(spans) and used + spans[end].tokens <= budget:
        used += spans[end].tokens
        end += 1
    return end


def _prefer_boundary(spans: list[Span], begin: int, first_new: int, end: int, budget: int) -> int:
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


def _skip_space(text: str, start: int, end: int) -> int:
    while start < end and text[start].isspace():
        start += 1
    return start


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """The bounds of text[start:end].strip() in text."""
    start = _skip_space(text, start, end)
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _has_text(text: str, start: int, end: int) -> bool:
    start, end = _stripped(text, start, end)
    return start < end


def _first_visible(text: str, start: int, end: int) -> int:
    """Where a token at text[start:end] begins, for counting: its first non-space character, if any."""
    visible = _skip_space(text, start, end)
    return visible if visible < end else start
