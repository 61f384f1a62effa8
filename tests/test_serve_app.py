"""arbor_cli/serve/app.py and worker.py in-process: Starlette's test client against a Server over a scripted
model (no weights), for the routes, the error bodies, streaming, a failure inside the worker, scoring, and
the prefix a following request reuses. tests/test_serve.py drives the real server with the real model."""

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from arbor_cli.serve import Server  # noqa: E402
from arbor_cli.session import Session  # noqa: E402
from arbor_cli.serve.app import create_app  # noqa: E402


class ScriptedTokenizer:
    """A token per character; a chat is its contents one after another."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=True):
        return [ord(c) for m in messages for c in m["content"]]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class ScriptedCache:
    def __init__(self, capacity):
        self.capacity, self.length = capacity, 0

    def truncate(self, length):
        self.length = min(self.length, length)


class ScriptedStream:
    """Answers "ab" one token at a time, or fails on a prompt ending in "!"."""

    def __init__(self, ids, cache, tokens):
        self.ids, self.cache, self.tokens, self.result = ids, cache, tokens, None

    def __iter__(self):
        if self.ids[-1] == ord("!"):
            raise RuntimeError("the kernel broke")
        self.cache.length += len(self.ids)
        for token in b"ab":
            self.tokens.append(token)
            self.cache.length += 1
            yield chr(token)
        self.result = SimpleNamespace(finish_reason="eos", tokens=self.tokens)


class ScriptedModel:
    prefill_chunk = 4
    context = 64

    def __init__(self):
        self.checkpoint = SimpleNamespace(name="/models/scripted.gguf")
        self.tokenizer = ScriptedTokenizer()
        self.config = SimpleNamespace(vocab_size=256, trained_context=64)
        self.prefilled: list[str] = []  # what each generation prefilled

    def plan(self, tokens):
        return SimpleNamespace(context=64)

    def session(self, context):
        session = Session(self, context)
        session.cache, session.grain = ScriptedCache(context), self.prefill_chunk  # kernels that count rows
        return session

    def stream(self, ids, options, *, session, continuing=False):
        start, tokens = session.reuse(ids, continuing), []
        session.hold(ids, start=start, generated=tokens)
        self.prefilled.append("".join(map(chr, ids[start:])))
        return ScriptedStream(ids[start:], session.cache, tokens)

    def score_prompt(self, ids, session):
        session.cache.length = len(ids)
        session.hold(ids, start=0)
        return [-1.0] * (len(ids) - 1)


@pytest.fixture
def served():
    model = ScriptedModel()
    with TestClient(create_app(Server(model, queue_size=2))) as client:
        yield client, model


def ask(client, text, **more):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **more})


def test_a_chat_is_answered_and_counted(served):
    client, _ = served
    r = ask(client, "Hello")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"
    assert r.json()["model"] == "scripted" and r.json()["usage"]["total_tokens"] == 7
    assert client.get("/health").json()["served"] == 1


def test_a_streamed_completion_ends_with_done(served):
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    payloads = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream") and payloads[-1] == "[DONE]"
    assert [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]] == ["a", "b", ""]


def test_a_failure_in_the_worker_is_a_500_or_an_error_event(served):
    client, _ = served
    r = ask(client, "Hello!")
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: the kernel broke"
    streamed = ask(client, "Hello!", stream=True).text
    assert '"type": "server_error"' in streamed and streamed.endswith("data: [DONE]\n\n")
    assert client.get("/health").json()["failed"] == 2


def test_a_following_request_reuses_whole_prefill_chunks(served):
    client, model = served
    ask(client, "012345678")
    ask(client, "012345678ab and more")
    assert model.prefilled[-1] == "8ab and more"  # 9 + 2 cached: 8 of them, in whole chunks of 4, reused
    assert client.get("/health").json()["reused_tokens"] == 8


def test_echo_with_logprobs_scores_the_prompt(served):
    client, _ = served
    logprobs = client.post("/v1/completions", json={"prompt": "abc", "echo": True, "logprobs": 0}).json()[
        "choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b", "c"] and logprobs["token_logprobs"] == [None, -1.0, -1.0]


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b'{"model": "gpt-9", "messages": []}', 404),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 100}', 400),
    ("POST", "/tokenize", b'{"content": 1}', 400),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/completions", None, 405),
])
def test_every_refusal_is_an_openai_error_body(served, method, path, body, status):
    client, _ = served
    r = client.request(method, path, content=body)
    assert r.status_code == status and r.json()["error"]["message"]


def test_models_tokenize_and_detokenize(served):
    client, _ = served
    [model] = client.get("/v1/models").json()["data"]
    assert (model["id"], model["owned_by"], model["max_model_len"]) == ("scripted", "arbor", 64)
    assert client.post("/tokenize", json={"content": "Hi"}).json() == {"tokens": [72, 105]}
    assert client.post("/detokenize", json={"tokens": [72, 105]}).json() == {"content": "Hi"}
