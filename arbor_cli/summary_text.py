"""The model's answer made into a summary: template tokens, role lines, preambles and repeats
dropped, a sentence cut off at the token limit removed, the text shaped as a paragraph or a list, and
held to --words (within WORDS_TOLERANCE: whole sentences while they fit).
"""

from __future__ import annotations

import re

TEMPLATE_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>|\[/?INST\]")
ROLE_LINE = re.compile(r"^\s*(assistant|user|system)\s*:?\s*$", re.IGNORECASE)
PREAMBLE = re.compile(r"^\s*(sure|certainly|of course|okay|ok)\b[^\n]*?[.!:]\s*\n?|"
                      r"^\s*(here\s+(is|are)|below\s+(is|are))\b[^\n]*?:\s*\n?", re.IGNORECASE)
HEADING = re.compile(r"^\s*(#+\s*)?\**\s*(summary|key points|notes)\s*\**\s*:?\s*\**\s*(\n|$)", re.IGNORECASE)
LABEL = re.compile(r"^\s*\**(summary|key points)\**\s*:\s*", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*•·+]|\d+[.)])\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
# --words N: a summary has at most N * (1 + WORDS_TOLERANCE) words. The model is asked for at most N and
# given about 1.5 tokens a word to finish its sentence; a small model overshoots (issue 32: --words 60 gave
# 76), so the answer keeps its whole sentences while they fit the limit, then as many of the next sentence's
# leading clauses as fit (at least MIN_CLAUSE_WORDS words, ending in an ellipsis): a last sentence that names a
# subject is not dropped whole for a trailing participle.
WORDS_TOLERANCE = 0.25
MIN_CLAUSE_WORDS = 6
CLAUSE_END = re.compile(r"[,;:](?=\s)|\s[—–]\s")


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
            key = key if re.search(r"[^\W\d_]", key) else ""  # a bare list number ("1.") repeats nothing
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


def word_limit(words: int) -> int:
    """The most words a summary asked for `words` may have: 60 -> 75, 150 -> 187."""
    return int(words * (1 + WORDS_TOLERANCE))


def count_words(text: str) -> int:
    """Words as a reader counts them: list markers are not words."""
    return sum(len(BULLET.sub("", line).split()) for line in text.splitlines())


def fit_words(text: str, words: int) -> str:
    """At most word_limit(words) words: the summary's sentences (each list item's, in order) kept while the
    total fits, then the leading clauses of the next one that fit, cut with an ellipsis; a sentence with no
    clause that fits is dropped (a first one is cut after `words` words)."""
    limit = word_limit(words)
    if count_words(text) <= limit:
        return text
    kept_lines, used, cut = [], 0, False
    for line in text.splitlines():
        marker, body = _list_marker(line)
        kept = []
        for sentence in (s.strip() for s in SENTENCE_END.split(body) if s.strip()):
            n = len(sentence.split())
            if used + n <= limit:
                kept.append(sentence)
                used += n
                continue
            head = _leading_clauses(sentence, limit - used)
            if head:
                kept.append(head)
            cut = True
            break
        if kept:
            kept_lines.append(marker + " ".join(kept))
        if cut:
            break
    if not kept_lines:  # one sentence longer than the limit, no clause of it short enough: its first words
        marker, body = _list_marker(text.splitlines()[0])
        return marker + " ".join(body.split()[:words]).rstrip(",;:") + "…"
    return "\n".join(kept_lines)


def _leading_clauses(sentence: str, room: int) -> str | None:
    """The longest run of the sentence's leading clauses (cut at , ; : or a dash) of MIN_CLAUSE_WORDS..room
    words, with an ellipsis; None if there is none."""
    heads = [sentence[:m.start()].rstrip() for m in CLAUSE_END.finditer(sentence)]
    fitting = [h for h in heads if MIN_CLAUSE_WORDS <= len(h.split()) <= room]
    return fitting[-1] + "…" if fitting else None


def _list_marker(line: str) -> tuple[str, str]:
    match = BULLET.match(line)
    return (line[:match.end()], line[match.end():]) if match else ("", line)
