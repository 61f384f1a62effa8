"""`arbor serve` as the CLI runs it (bind, announce, uvicorn, signals, exit code), over a scripted model that
answers one letter every STEP_S seconds, ignoring EOS, up to max_tokens: the server's behaviour with slow
generations, leaving clients, Ctrl-C and slow connections, in seconds and without weights.

    python tests/serve_scripted.py --port 8080 [--api-key K] [--queue-size N]   # any `arbor serve` options
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

STEP_S = float(os.environ.get("SCRIPTED_STEP_S", "0.02"))  # one token every 20 ms: 2,000 tokens take 40 s


class LetterTokenizer:
    """A token per character; a chat is its contents one after another."""

    chat_template = "scripted"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 256 for c in text]

    def encode_chat(self, messages, add_generation_prompt=True):
        return [ord(c) % 256 for m in messages for c in m["content"]]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class LetterCache:
    def __init__(self, capacity):
        self.capacity, self.length = capacity, 0

    def truncate(self, length):
        self.length = min(self.length, length)


class LetterStream:
    def __init__(self, ids, cache, tokens, max_new_tokens):
        self.ids, self.cache, self.tokens, self.max_new_tokens, self.result = ids, cache, tokens, max_new_tokens, None

    def __iter__(self):
        self.cache.length += len(self.ids)
        for i in range(self.max_new_tokens):
            time.sleep(STEP_S)
            token = ord("a") + i % 26
            self.tokens.append(token)
            self.cache.length += 1
            yield chr(token)
        self.result = SimpleNamespace(finish_reason="length", tokens=self.tokens)


class LetterModel:
    """What the server needs of a Model (arbor_cli/model.py), answering letters slowly."""

    prefill_chunk = 4
    context = 4096
    backend, device, dtype = "scripted", "cpu", "float32"

    def __init__(self):
        self.checkpoint = SimpleNamespace(name="scripted", path="scripted")
        self.tokenizer = LetterTokenizer()
        self.config = SimpleNamespace(vocab_size=256, trained_context=4096)

    def plan(self, tokens):
        return SimpleNamespace(context=4096)

    def session(self, context):
        from arbor_cli.session import Session

        session = Session(self, context)
        session.cache, session.grain = LetterCache(context), self.prefill_chunk
        return session

    def stream(self, ids, options, *, session, continuing=False):
        start, tokens = session.reuse(ids, continuing), []
        session.hold(ids, start=start, generated=tokens)
        return LetterStream(ids[start:], session.cache, tokens, options.max_new_tokens)

    def score_prompt(self, ids, session):
        session.cache.length = len(ids)
        session.hold(ids, start=0)
        return [-1.0] * (len(ids) - 1)


def main(argv: list[str]) -> None:
    import importlib
    import importlib.util

    from arbor_cli.cli import app

    if importlib.util.find_spec("arbor_cli.serve.listen") is not None:  # a test of slow clients waits this long
        listen = importlib.import_module("arbor_cli.serve.listen")
        listen.BoundedH11Protocol.head_timeout_s = float(os.environ.get("SCRIPTED_HEAD_TIMEOUT_S",
                                                                        listen.HEAD_TIMEOUT_S))
        http = importlib.import_module("arbor_cli.serve.app")
        http.BODY_TIMEOUT_S = float(os.environ.get("SCRIPTED_BODY_TIMEOUT_S", http.BODY_TIMEOUT_S))
    importlib.import_module("arbor_cli.cli.serve").load_model = lambda opts: LetterModel()  # the command as it is, over the scripted model
    one = [] if "--parallel" in argv else ["--parallel", "1"]  # the scripted model answers one request at a time
    app(["serve", *one, *argv], prog_name="arbor")


if __name__ == "__main__":
    main(sys.argv[1:])
