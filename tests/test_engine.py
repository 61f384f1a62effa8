"""--engine (arbor_cli/engine.py): summarize, ask and chat on an OpenAI-compatible server. Fast tests run
against a scripted server in a thread (concurrency, retries, errors, resuming); the slow one compares
a summary through `arbor serve` with the local one."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from arbor_cli import engine
from arbor_cli.ask import ask
from arbor_cli.engine import EngineError, RemoteModel
from arbor_cli.summarize import summarize
from conftest import FakeTokenizer, document


class Script:
    """What the scripted server answers, and what it saw."""

    def __init__(self, delay=0.0, fail=(), status=503, scores=True, answer=None):
        self.delay, self.fail, self.status, self.scores = delay, set(fail), status, scores
        self.answer = answer or (lambda prompt: "Notes: " + " ".join(prompt.split()[:6]))
        self.requests, self.running, self.most = 0, 0, 0
        self.bodies = []
        self.lock = threading.Lock()


def serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply(200, {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 4096}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.bodies.append(body)
                script.requests += 1
                number = script.requests
                script.running += 1
                script.most = max(script.most, script.running)
            try:
                time.sleep(script.delay)
                if number in script.fail:
                    self.reply(script.status, {"error": {"message": f"scripted failure {number}"}},
                               [("Retry-After", "0")] if script.status == 503 else ())
                elif self.path.endswith("/completions") and "messages" not in body:
                    n = len(body["prompt"])
                    logprobs = {"token_logprobs": [None] + [-1.0] * (n - 1)} if script.scores else None
                    self.reply(200, {"choices": [{"text": "", "logprobs": logprobs, "finish_reason": "length"}]})
                else:
                    text = script.answer(body["messages"][-1]["content"])
                    self.reply(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
            finally:
                with script.lock:
                    script.running -= 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def scripted():
    servers = []

    def start(**kw):
        script = Script(**kw)
        httpd, url = serve(script)
        servers.append(httpd)
        return script, url
    yield start
    for httpd in servers:
        httpd.shutdown()


def remote(url, tmp_path, **kw) -> RemoteModel:
    checkpoint = SimpleNamespace(config=SimpleNamespace(trained_context=4096), name="fake", path=tmp_path)
    return RemoteModel(url, checkpoint, FakeTokenizer(), answer_log=tmp_path / "answers.jsonl", **kw)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(engine, "BACKOFF_S", 0.01)


def test_the_map_phase_sends_parallel_requests_at_once_and_gives_the_same_summary(scripted, tmp_path):
    text = document(150)  # ~10,000 words: several parts of a 4,096-token engine
    script, url = scripted(delay=0.2)
    one = summarize(remote(url, tmp_path / "a", parallel=1), text)
    assert script.most == 1 and one.chunks >= 2
    script4, url4 = scripted(delay=0.2)
    four = summarize(remote(url4, tmp_path / "b", parallel=4), text)
    assert script4.most >= 2 and four.text == one.text and four.chunks == one.chunks


def test_transient_failures_are_retried_and_said(scripted, tmp_path):
    script, url = scripted(fail={1, 2}, status=503)
    model = remote(url, tmp_path)
    heard = []
    model.notify = heard.append
    assert model.chat([{"role": "user", "content": "Hello there"}]).text == "Notes: Hello there"
    assert script.requests == 3 and len(heard) == 2 and "retrying" in heard[0]


def test_a_refused_request_is_one_line_and_not_retried(scripted, tmp_path):
    script, url = scripted(fail={1}, status=400)
    with pytest.raises(EngineError) as e:
        remote(url, tmp_path).chat([{"role": "user", "content": "Hi"}])
    assert "answered 400" in str(e.value) and "scripted failure 1" in str(e.value) and "\n" not in str(e.value)
    assert script.requests == 1


def test_an_engine_that_cannot_be_reached_is_one_line_after_retries(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(EngineError, match="cannot reach the engine .* after 4 tries"):
        remote(f"http://127.0.0.1:{port}", tmp_path)


def test_a_run_the_engine_broke_off_resumes_without_asking_again(scripted, tmp_path):
    text = document(150)
    _, url = scripted(fail={4}, status=400)
    with pytest.raises(EngineError, match="scripted failure 4"):
        summarize(remote(url, tmp_path), text)  # parts 1-3 were answered, part 4 refused
    again, url2 = scripted()
    resumed = summarize(remote(url2, tmp_path), text)  # the same answer log
    fresh, url3 = scripted()
    whole = summarize(remote(url3, tmp_path / "elsewhere"), text)
    assert again.requests == fresh.requests - 3 and resumed.text == whole.text


def test_ask_ranks_parts_with_the_engines_prompt_scores_or_answers_every_part_without_them(scripted, tmp_path):
    key = "The pass key is 91644."
    parts = document(120).split("\n\n")
    parts.insert(70, key)
    for at in (110, 95, 40, 20, 5):  # parts that name the pass key without it: read too
        parts.insert(at, "Nobody wrote the pass key down here.")
    text = "\n\n".join(parts)

    def answer(prompt):
        return key if "91644" in prompt else "The pass key is 1234."

    _, url = scripted(answer=answer)  # scores every token alike: the parts tie and rank in document order
    ranked = ask(remote(url, tmp_path, parallel=3), text, "What is the pass key?")
    assert ranked.text.startswith(key) and len(ranked.answered) < ranked.read  # it stopped at the key
    _, url2 = scripted(answer=answer, scores=False)
    model = remote(url2, tmp_path / "u", parallel=3)
    heard = []
    model.notify = heard.append
    unranked = ask(model, text, "What is the pass key?")
    assert unranked.text.startswith(key) and len(unranked.answered) == unranked.read >= 5  # every part read answered
    assert any("does not score" in h for h in heard)


def test_a_schema_goes_to_the_engine_as_response_format(scripted, tmp_path):
    pytest.importorskip("llguidance")
    script, url = scripted(answer=lambda prompt: '{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    model = remote(url, tmp_path)
    assert model.chat([{"role": "user", "content": "Hi"}], schema=schema).text == '{"a": 1}'
    model.chat([{"role": "user", "content": "Hi again"}], schema="json_object")
    assert [b["response_format"] for b in script.bodies] == [
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        {"type": "json_object"}]


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
          "required": ["name", "role"], "additionalProperties": False}


def people_document(names: list[str]) -> str:
    paragraphs = document(60).split("\n\n")
    for i, name in enumerate(names):
        paragraphs.insert(1 + i * 60 // len(names), f"Name: {name}, role: clerk{i}.")
    return "\n\n".join(paragraphs)


def extracting_engine(prompt: str) -> str:
    """An engine that reads the part in an extraction prompt: its planted people, and one it invents."""
    import re

    part = prompt.split("\n\n---\n")[0]
    items = [{"name": n, "role": r} for n, r in re.findall(r"Name: (\w+ \w+), role: (\w+)", part)]
    return json.dumps({"items": items + [{"name": "Zed Invented", "role": "wizard"}]})


def test_extract_sends_every_part_with_the_items_schema_as_response_format_parallel_n_at_once(scripted, tmp_path):
    pytest.importorskip("llguidance")
    from arbor_cli.documents import Document
    from arbor_cli.extract_records import extract_records, items_schema

    names = ["Alice Moreno", "Bashir Khan", "Chen Wei", "Dana Scott"]
    documents = [Document("people.txt", people_document(names))]
    script1, url1 = scripted(delay=0.2, answer=extracting_engine)
    one = extract_records(remote(url1, tmp_path / "a", parallel=1), documents, PERSON, part_tokens=1000)
    script4, url4 = scripted(delay=0.2, answer=extracting_engine)
    four = extract_records(remote(url4, tmp_path / "b", parallel=4), documents, PERSON, part_tokens=1000)
    assert script1.most == 1 and script4.most >= 2 and four.to_json() == one.to_json()
    assert one.parts >= 4 and sorted(i["name"] for i in one.items) == names and one.dropped == one.parts
    wrapped = json.loads(items_schema(PERSON)[0])
    assert len(script4.bodies) == one.parts and all(b["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": wrapped, "strict": True}}
        for b in script4.bodies)


def test_arbor_extract_takes_engine_and_parallel(scripted, tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    from typer.testing import CliRunner

    from arbor_cli.cli import app

    script, url = scripted(delay=0.05, answer=extracting_engine)
    connected = []

    def connect(url, model=None, *, parallel=1, **_):
        connected.append(parallel)
        return remote(url, tmp_path, parallel=parallel)
    monkeypatch.setattr(engine, "connect", connect)
    path = tmp_path / "people.txt"
    path.write_text(people_document(["Alice Moreno", "Bashir Khan"]))
    r = CliRunner().invoke(app, ["extract", str(path), "--schema", json.dumps(PERSON), "--engine", url, "--parallel",
                                 "3", "--part-tokens", "1000", "--jsonl"])
    assert r.exit_code == 0, r.output
    assert connected == [3] and script.most >= 2
    assert [json.loads(line)["name"] for line in r.stdout.splitlines()] == ["Alice Moreno", "Bashir Khan"]


def test_parallel_without_an_engine_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "summarize", "-", "--parallel", "4"], input="Some text.",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--parallel needs --engine" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_summary_through_arbor_serve_is_the_local_summary(default_checkpoint, tmp_path):
    import os
    import socket

    import httpx

    from long_document import long_document

    doc = tmp_path / "doc.txt"
    doc.write_text(long_document(8))  # ~2,300 tokens: 2 parts of a 2,048-token context
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ARBOR_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}
    server = subprocess.Popen([sys.executable, "-m", "arbor_cli", "serve", "--model", str(default_checkpoint.path),
                               "--port", str(port), "--context", "2048", "--parallel", "1"],  # answers as here
                              stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        common = [sys.executable, "-m", "arbor_cli", "summarize", str(doc), "--json", "--context", "2048",
                  "--model", str(default_checkpoint.path)]
        local = subprocess.run(common, capture_output=True, text=True, timeout=900, env=env)
        remote_run = subprocess.run(common + ["--engine", f"http://127.0.0.1:{port}", "--parallel", "4"],
                                    capture_output=True, text=True, timeout=900, env=env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert local.returncode == 0 and remote_run.returncode == 0, local.stderr + remote_run.stderr
    here, there = json.loads(local.stdout), json.loads(remote_run.stdout)
    assert here["chunks"] == there["chunks"] >= 2
    assert here["text"] == there["text"]
