"""Hostile clients of `arbor serve` (issue 31): malformed parameters are 400s naming the parameter, a
non-streaming client that leaves stops its generation, one Ctrl-C stops the server (exit 130), slow and too
many connections are bounded, a bind that fails is one line, and /health tells a caller without the API
key only that the server is up. In-process over test_serve_app's kind of scripted model, or as a process
(tests/serve_scripted.py: the `arbor serve` command over a model that answers a letter every 20 ms)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from arbor_cli.serve import Server  # noqa: E402
from arbor_cli.serve.app import create_app  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from serve_scripted import LetterModel  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]


# ---- in process: the request bodies ---------------------------------------------------------------------
@pytest.fixture
def served():
    with TestClient(create_app(Server(LetterModel(), queue_size=2, api_key="K")), raise_server_exceptions=False
                    ) as client:
        client.headers["Authorization"] = "Bearer K"
        yield client


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": HI, "stop": 123}, "stop"),
    ("/v1/chat/completions", {"messages": HI, "stop": ["x", 5]}, "stop"),
    ("/v1/completions", {"prompt": "x", "top_k": float("inf")}, "top_k"),  # JSON's Infinity
    ("/v1/completions", {"prompt": "x", "top_k": 2.5}, "top_k"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["Hi"]}]}, "messages"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "stream_options": "yes"}, "stream_options"),
    ("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("/v1/chat/completions", {"messages": HI, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "seed": "7"}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": "many"}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, "top_k"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [256]}, "tokens"),
])
def test_a_malformed_parameter_is_a_400_naming_it_and_nothing_runs(served, path, body, param):
    r = served.post(path, content=json.dumps(body, allow_nan=True))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    health = served.get("/health").json()
    assert health["served"] == health["failed"] == 0 and not health["busy"] and health["waiting"] == 0


def test_health_without_the_api_key_says_only_that_the_server_is_up(served):
    bare = httpx.Headers({"Authorization": "Bearer wrong"})
    for headers in (bare, {"Authorization": ""}):
        r = served.get("/health", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    full = served.get("/health").json()
    assert full["status"] == "ok" and full["model"] == "scripted" and "served" in full and "queue_size" in full
    assert served.get("/v1/models", headers=bare).status_code == 401


# ---- as a process: the `arbor serve` command over the scripted model --------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, *args, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": os.pathsep.join(sys.path), **env}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "serve_scripted.py"), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the scripted server did not start")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self, sig=signal.SIGINT, timeout=10) -> tuple[int, str, str, float]:
        t0 = time.time()
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err, time.time() - t0


@pytest.fixture
def running():
    servers = []

    def start(*args, **env):
        servers.append(Running(*args, **env))
        return servers[-1]

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def wait_until(condition, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def test_a_non_streaming_client_that_leaves_stops_its_generation(running):
    server = running()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2000, "ignore_eos": True},
                   timeout=1.0)  # 2,000 tokens take 40 s here
    freed = wait_until(lambda: not server.health()["busy"], timeout=5)
    assert server.health()["cancelled"] == 1 and freed < 2.5
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"


def test_one_sigint_during_a_stream_stops_the_server_exit_130(running):
    server = running()
    got = []

    def stream():
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 2000, "stream": True}) as r:
            got.extend(r.iter_lines())

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: server.health()["busy"], timeout=5)
    code, out, err, took = server.stop(signal.SIGINT)
    reader.join(timeout=10)
    assert code == 130 and took < 5 and out == ""
    assert [line for line in err.splitlines() if line.strip()][1:] == ["arbor: interrupted"], err
    assert "Traceback" not in err and "CancelledError" not in err
    assert got[-2:] == ["data: [DONE]", ""] or got[-1] == "data: [DONE]"  # the stream was ended, not cut


def test_an_idle_sigint_exits_130(running):
    code, out, err, took = running().stop(signal.SIGINT)
    assert code == 130 and took < 5 and out == "" and err.splitlines()[-1] == "arbor: interrupted"


HEAD_TIMEOUT_S = 2.0  # the scripted server's, for this test (arbor serve's is listen.HEAD_TIMEOUT_S)


def test_slow_headers_are_closed_and_open_connections_are_capped(running):
    import arbor_cli.serve.listen as listen

    server = running(SCRIPTED_HEAD_TIMEOUT_S=str(HEAD_TIMEOUT_S), SCRIPTED_BODY_TIMEOUT_S=str(HEAD_TIMEOUT_S))
    trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    for s in trickling:
        s.sendall(b"G")  # a request line that never ends
    t0 = time.time()
    for s in trickling:
        s.settimeout(HEAD_TIMEOUT_S + 5)
        assert s.recv(1) == b""  # closed by the server
    assert HEAD_TIMEOUT_S - 0.5 < time.time() - t0 < HEAD_TIMEOUT_S + 2
    slow_body = socket.create_connection(("127.0.0.1", server.port))
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    slow_body.settimeout(HEAD_TIMEOUT_S + 5)
    t0 = time.time()
    answer = ""
    while "request_timeout" not in answer and (chunk := slow_body.recv(4096)):  # head and body may come apart
        answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in answer.replace(" ", ""), answer
    assert time.time() - t0 < HEAD_TIMEOUT_S + 2
    slow_body.close()
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(listen.DEFAULT_MAX_CONNECTIONS)]
    extra = socket.create_connection(("127.0.0.1", server.port))
    extra.settimeout(5)
    assert extra.recv(1) == b""  # past the cap: closed at once
    for s in held + [extra, *trickling]:
        s.close()
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10).status_code == 200


@pytest.mark.parametrize("host, says", [("127.0.0.1", "the port is in use (another server?)"),
                                        ("no-such-host.invalid", "the host does not resolve")])
def test_a_bind_that_fails_is_one_line_exit_1_and_nothing_announced(host, says, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "arbor_cli", "serve", "--host", host, "--port", str(port),
                            "--model", str(tmp_path / "never-loaded"), "--api-key", "K"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"arbor: error: cannot listen on {host}:{port}: {says}"), r.stderr


# ---- a fuzz run over the OpenAI request shapes ------------------------------------------------------------
def fuzz_strategies():
    from hypothesis import strategies as st

    junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                        | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    text = st.text(max_size=12)
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5]), "text": text | junk})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", None]),
                                     "content": text | st.lists(part | junk, max_size=3) | junk})
    small = st.integers(-3, 40)
    params = {
        "model": st.sampled_from(["scripted", "gpt-9"]) | junk, "max_tokens": small | junk,
        "max_completion_tokens": small | junk, "temperature": st.floats(-1, 3) | junk, "top_p": st.floats(0, 1.5) | junk,
        "top_k": small | junk, "seed": st.integers(-5, 2**80) | junk, "stop": text | st.lists(text, max_size=3) | junk,
        "stream": st.booleans() | junk, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
        "ignore_eos": st.booleans() | junk, "n": st.integers(0, 3) | junk, "repetition_penalty": st.floats(0, 3) | junk,
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}]) | junk,
        "logprobs": st.integers(-1, 3) | st.booleans() | junk, "echo": st.booleans() | junk,
    }
    optional = st.fixed_dictionaries({}, optional=params)
    chat = st.tuples(st.just("/v1/chat/completions"), st.builds(
        lambda messages, rest: {"messages": messages, **rest}, st.lists(message, max_size=3) | junk, optional))
    completion = st.tuples(st.just("/v1/completions"), st.builds(
        lambda prompt, rest: {"prompt": prompt, **rest},
        text | st.lists(st.integers(-3, 300), max_size=5) | st.lists(text | st.lists(small), max_size=2) | junk,
        optional))
    tokens = st.tuples(st.sampled_from(["/tokenize", "/detokenize"]), st.fixed_dictionaries(
        {}, optional={"content": text | junk, "tokens": st.lists(st.integers(-2**40, 2**40), max_size=4) | junk}))
    return st.one_of(chat, completion, tokens, st.tuples(st.sampled_from(["/v1/chat/completions", "/tokenize"]),
                                                         junk))


@pytest.mark.slow
def test_fuzzed_request_bodies_never_get_a_500_nor_a_traceback(running):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    server = running("--queue-size", "4", SCRIPTED_STEP_S="0")
    seen = {}

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz_strategies())
    def post(case):
        path, body = case
        r = httpx.post(server.url + path, content=json.dumps(body, allow_nan=True), timeout=10)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404), (path, body, r.status_code, r.text[:300])
        if r.status_code != 200 or not r.headers["content-type"].startswith("text/event-stream"):
            assert isinstance(r.json(), dict)  # an OpenAI-style body, never plain text
        if r.status_code != 200:
            assert r.json()["error"]["message"]

    post()
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HI, "max_tokens": 3}, timeout=10)
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "abc"
    code, out, err, _ = server.stop(signal.SIGINT)
    assert code == 130 and "Traceback" not in err and "ERROR" not in err, err
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 50, seen  # the run reached both sides
