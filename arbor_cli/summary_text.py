"""The model's answer made into a summary: template tokens, role lines, preambles and repeats
dropped, a sentence cut off at the token limit removed, and the text shaped as a paragraph or a list.
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
