"""What the summariser asks the model: the options a person gives (--words, --style, --focus), the
prompts they fill (one pass, a part's notes, the combination of notes; several documents under their
names), and what each prompt costs in tokens, so summarize.py can size the parts to the context.
"""

from __future__ import annotations

from dataclasses import dataclass

from arbor_core.errors import UsageError

from .documents import Document

STYLES = ("paragraph", "bullets")
MIN_WORDS, MAX_WORDS = 1, 2000
DEFAULT_WORDS = 150
NOTE_WORDS = 50            # each chunk's notes: short, so the map phase decodes little
TOKENS_PER_WORD = 1.5      # English runs ~1.3 tokens a word; the rest is room for the last sentence
ANSWER_SLACK_TOKENS = 16
PROMPT_MARGIN_TOKENS = 32  # tokenization at the seams of template and text may differ a little

SYSTEM_PROMPT = "You are a careful assistant who writes accurate, concise summaries of documents."
ONE_PASS_PROMPT = ("Read the document below.\n\n---\n{text}\n---\n\n"
                   "Summarize the document above in at most {words} words{style}. "
                   "Name its main subjects and state its key points.{focus}")
MAP_PROMPT = ("Here is part {index} of {count} of a longer document.\n\n---\n{text}\n---\n\n"
              "List the key points of this part in at most {words} words. Name the subjects it is about.{focus}")
REDUCE_PROMPT = ("Here are notes on the parts of one document, in order.\n\n---\n{text}\n---\n\n"
                 "Write one summary of the whole document in at most {words} words{style}. "
                 "Name its main subjects and state its key points.{focus}")
# several documents: each under its name, in the one-pass prompt and in the combination of their summaries
DOCUMENT_BLOCK = "Document {index}: {name}\n---\n{text}\n---"
DOCUMENTS_PROMPT = ("Read the {count} documents below, each under its name.\n\n{text}\n\n"
                    "Summarize them in at most {words} words{style}, saying which document each point comes from. "
                    "Name their main subjects and state their key points.{focus}")
COMBINE_PROMPT = ("Here are summaries of several documents, each under its name.\n\n---\n{text}\n---\n\n"
                  "Write one summary of all of them in at most {words} words{style}, saying which document each "
                  "point comes from. Name their main subjects and state their key points.{focus}")
FOCUS_HINT = "\n\nAbove all, follow this instruction: {focus}"
MAX_FOCUS_CHARS = 500
STYLE_HINTS = {"paragraph": ", as one paragraph", "bullets": ", as a list of bullet points, one per line, each starting with '- '"}


@dataclass(frozen=True)
class SummaryOptions:
    words: int = DEFAULT_WORDS
    style: str = "paragraph"
    focus: str | None = None  # the user's own instruction ("Summarize the key findings"), in every prompt
    batch: int = 1  # parts (or groups of notes) decoded together on a model here; 0: as many as fit (planner)

    @classmethod
    def build(cls, words: int = DEFAULT_WORDS, style: str = "paragraph", focus: str | None = None,
              batch: int = 1) -> "SummaryOptions":
        """Validate user-supplied values; each bad one is a UsageError naming the option."""
        if isinstance(words, bool) or not isinstance(words, int) or not MIN_WORDS <= words <= MAX_WORDS:
            raise UsageError(f"--words must be an integer in {MIN_WORDS}..{MAX_WORDS}, got {words!r}")
        if style not in STYLES:
            raise UsageError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
        if focus is not None and (not focus.strip() or len(focus) > MAX_FOCUS_CHARS):
            raise UsageError(f"--focus must be an instruction of 1..{MAX_FOCUS_CHARS} characters")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise UsageError(f"--batch must be 0 (as many as fit) or a positive integer, got {batch!r}")
        return cls(words, style, " ".join(focus.split()) if focus else None, batch)

    @property
    def focus_hint(self) -> str:
        return FOCUS_HINT.format(focus=self.focus) if self.focus else ""

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


def one_pass_prompt_tokens(model, options: SummaryOptions) -> int:
    return prompt_tokens(model, one_pass_messages("", options))


def map_prompt_tokens(model, options: SummaryOptions, count: int) -> int:
    return prompt_tokens(model, map_messages("", count, count, options))


def reduce_prompt_tokens(model, options: SummaryOptions, prompt: str = REDUCE_PROMPT) -> int:
    return prompt_tokens(model, reduce_messages("", options.words, options.style, options.focus_hint, prompt))


def prompt_tokens(model, messages: list[dict]) -> int:
    return len(model.tokenizer.encode_chat(messages, add_generation_prompt=True)) + PROMPT_MARGIN_TOKENS


def one_pass_messages(text: str, options: SummaryOptions) -> list[dict]:
    prompt = ONE_PASS_PROMPT.format(text=text, words=options.words, style=STYLE_HINTS[options.style],
                                    focus=options.focus_hint)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def map_messages(text: str, index: int, count: int, options: SummaryOptions) -> list[dict]:
    prompt = MAP_PROMPT.format(text=text, index=index, count=count, words=options.note_words, focus=options.focus_hint)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def reduce_messages(notes: str, words: int, style: str, focus_hint: str = "", prompt: str = REDUCE_PROMPT
                    ) -> list[dict]:
    prompt = prompt.format(text=notes, words=words, style=STYLE_HINTS[style], focus=focus_hint)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def documents_messages(documents: list[Document], options: SummaryOptions) -> list[dict]:
    blocks = "\n\n".join(DOCUMENT_BLOCK.format(index=i, name=name, text=text.strip())
                          for i, (name, text) in enumerate(documents, 1))
    prompt = DOCUMENTS_PROMPT.format(count=len(documents), text=blocks, words=options.words,
                                     style=STYLE_HINTS[options.style], focus=options.focus_hint)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
