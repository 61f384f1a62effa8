"""The fake door (arbor_core.door.Door) on words: a tokenizer of one token per word or punctuation mark and
the one fake Model (summarize, evals, chat, the door contract). conftest.py hands them to the test modules."""

import re as _re

from arbor_core.errors import OutOfMemoryError as _OutOfMemoryError

WORD = _re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Where each of count_words' tokens lies in text."""
    return [m.span() for m in WORD.finditer(text)]


class FakeTokenizer:
    """One token per word or punctuation mark; chat messages cost their words plus 4 per message."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * count_words(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        offsets = word_offsets(text)
        return [1] * len(offsets), offsets

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [1] * sum(count_words(m["content"]) + 4 for m in messages)

    def decode(self, ids: list[int]) -> str:
        return " ".join("w" for _ in ids)


class FakeModel:
    """The door (arbor_core.door.Door) on words. Plans with the planner over BUCKETS up to `largest`; chat
    answers from a script, records prompts and the context asked for, and runs out of memory above
    `oom_above`; a prompt is scored -1 nat a token."""

    def __init__(self, largest: int = 4096, answer=None, oom_above: int | None = None, context: int | None = None,
                 tokenizer=None, trained: int = 4096, rope_method: str = "auto"):
        from types import SimpleNamespace

        self.tokenizer = tokenizer or FakeTokenizer()
        self.config = SimpleNamespace(trained_context=trained, rope_scaling=None)
        self.checkpoint = SimpleNamespace(name="fake", path=None, config=self.config)
        self.largest = largest
        self.context = context  # the user's --context: read, never written
        self.rope_method = rope_method  # likewise
        self.calls: list[tuple[int, int | None, str | None]] = []  # generate(): (prompt tokens, context=, rope=)
        self.answer = answer or (lambda prompt: "Bees make honey. Volcanoes erupt.")
        self.oom_above = oom_above
        self.prompts: list[str] = []
        self.max_new: list[int] = []
        self.chat_contexts: list[int | None] = []  # the context= of each chat call
        self.plans: list[tuple[int, int | None]] = []
        self.notices: list[str] = []
        self.notify = self.notices.append

    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None):
        from arbor_core.planner import bucket_within

        requested = self.context if requested is None else requested
        self.plans.append((needed_tokens, requested))
        return bucket_within(needed_tokens, self.largest, self.config.trained_context, requested)

    def smaller_context(self, error, context: int, *, needed: int = 0, pinned: bool = False) -> int:
        from arbor_core.planner import smaller_after_out_of_memory

        return smaller_after_out_of_memory(error, context, needed=needed, pinned=pinned)

    def rope_scaling_for(self, context: int, rope: str | None = None):
        return {"rope_type": "linear", "factor": context / 4096} if context > 4096 else None

    def session_context(self) -> int:
        return self.plan(self.context or self.config.trained_context).context

    def kv_bytes_per_token(self) -> None:
        return None  # nothing kept on disk

    def session(self, context: int | None = None, rope: str | None = None):
        from arbor_cli.session import Session

        return Session(self, context or self.session_context(), rope)

    def map(self, work, items, on_done=None):
        from arbor_cli.mapping import map_in_order

        return map_in_order(work, items, on_done)

    def stream_many(self, prompts, options, *, context=None, rope=None, parallel=None):
        from arbor_cli.mapping import stream_each

        return stream_each(self, prompts, options, context=context, rope=rope)

    def chat(self, messages, stream=False, *, context=None, rope=None, session=None, continuing=False,
             max_new_tokens=256, temperature=0.0, **_):
        from arbor_cli.generate import GenerationResult

        self.chat_contexts.append(context)
        prompt = messages[-1]["content"]
        needed = sum(count_words(m["content"]) + 4 for m in messages) + max_new_tokens
        capacity = context or self.context or self.plan(needed).context
        assert needed <= capacity, f"a prompt of {needed} tokens overflows a {capacity}-token context"
        if self.oom_above is not None and capacity > self.oom_above:
            raise _OutOfMemoryError("out of memory (fake)")
        assert temperature == 0.0
        self.prompts.append(prompt)
        self.max_new.append(max_new_tokens)
        text = self.answer(prompt)
        timings = {"prompt_tokens": needed - max_new_tokens, "generated_tokens": count_words(text),
                   "prefill_s": 0.01, "decode_s": 0.02}
        if session is not None:
            session.hold(self.tokenizer.encode_chat(messages) + self.tokenizer.encode(text), start=0)
        return GenerationResult(text, [1] * count_words(text), "eos", timings, capacity)

    def stream(self, prompt, options, *, session=None, continuing=False, context=None, rope=None):
        """chat's answer to messages, or the scripted answer to token ids' decoding, as one piece."""
        from arbor_cli.generate import GenerationResult, GenerationStream

        if prompt and isinstance(prompt[0], dict):
            result = self.chat(prompt, context=context, session=session, max_new_tokens=options.max_new_tokens)
        else:
            result = GenerationResult(self.answer(self.tokenizer.decode(prompt)), [], "eos", {}, context or 0)

        def pieces():
            yield result.text
            return result
        return GenerationStream(pieces(), [])

    def generate(self, ids, max_new_tokens=256, *, context=None, rope=None, **_):
        """Completes token ids (decoded with the tokenizer) with `answer`; records each call."""
        from types import SimpleNamespace

        self.calls.append((len(ids), context, rope))
        return SimpleNamespace(text=self.answer(self.tokenizer.decode(ids)))

    def score_prompt(self, ids, session=None) -> list[float]:
        if session is not None:
            session.hold(session.ids + list(ids), start=0)
        return [-1.0] * (len(ids) - 1)

    def prefill(self, ids, session) -> None:
        session.hold(session.ids + list(ids), start=0)
