"""The door `arbor ask` uses, on words (no weights): a tokenizer of one id per word, and DocModel, whose
scores and answers the test gives as functions of the prompt's text. test_ask.py and the tests of the
evidence rules and whole-document questions share it."""

import re
from types import SimpleNamespace

from conftest import document

from arbor_cli.generate import GenerationResult

TOKEN = re.compile(r"\w+|[^\w\s]|\n")


class WordTokenizer:
    """One id per word, punctuation mark or line break; decode joins them back (spacing aside)."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._id(w) for w in TOKEN.findall(text)]

    def encode_with_offsets(self, text: str):
        spans = [m.span() for m in TOKEN.finditer(text)]
        return [self._id(text[a:b]) for a, b in spans], spans

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        ids = []
        for m in messages:
            ids += [self._id(f"<{m['role']}>")] + self.encode(m["content"]) + [self._id("<end>")]
        return ids + ([self._id("<assistant>")] if add_generation_prompt else [])

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class DocModel:
    """The door ask uses, on words: a session holds ids; `score(prompt)` is the question's log-probability
    after a part, `answer(prompt)` the reply, `judge(prompt)` each token's log-probability in a prompt scored
    alone (a quote judged by the model). Records what it was asked."""

    def __init__(self, answer, score=lambda prompt: -1.0 * prompt.count("key"), trained: int = 4096,
                 judge=lambda prompt: 0.0):
        self.tokenizer = WordTokenizer()
        self.config = SimpleNamespace(trained_context=trained)
        self.answer_for, self.score_for = answer, score
        self.judge = judge
        self.prompts: list[str] = []  # what each answer was given
        self.notices: list[str] = []
        self.notify = self.notices.append

    def session(self, context=None, rope=None):
        from arbor_cli.session import Session

        return Session(self, context)

    def prefill(self, ids, session):
        session.hold(session.ids + ids, start=0)

    def score_prompt(self, ids, session=None) -> list[float]:
        """The whole score on the question's second token (ask sums the question's tokens after the first);
        without a session, `judge(prompt)` on every token of the prompt alone (a quote's judgement)."""
        if session is None:
            return [self.judge(self.tokenizer.decode(ids))] * (len(ids) - 1)
        session.hold(session.ids + ids, start=0)
        return [0.0, self.score_for(self.tokenizer.decode(session.ids))] + [0.0] * (len(ids) - 3)

    def chat(self, messages, *, context=None, session=None, continuing=False, max_new_tokens=256, temperature=0.0,
             stop=None):
        prompt = self.tokenizer.decode(self.tokenizer.encode_chat(messages, add_generation_prompt=True))
        self.prompts.append(prompt)
        return GenerationResult(self.answer_for(prompt), [], "eos", {}, context or 0)

    def map(self, work, items, on_done=None):
        from arbor_cli.mapping import map_in_order

        return map_in_order(work, items, on_done)

    def kv_bytes_per_token(self) -> int:
        return 1


def planted(lines: dict[int, str], paragraphs: int = 120) -> str:
    """conftest.document's paragraphs with `lines` put in at their paragraph numbers."""
    parts = document(paragraphs).split("\n\n")
    for at in sorted(lines, reverse=True):
        parts.insert(at, lines[at])
    return "\n\n".join(parts)


def kjv_like(paragraphs: int) -> list[str]:
    """Real-looking prose paragraphs (numbered, so none repeats), ~60 tokens each."""
    return [f"In the {i}th year the people went up from the valley of stones to the hill country, and they "
            f"dwelt there {i} days, and the elders counted the flocks and the herds that were with them."
            for i in range(paragraphs)]
