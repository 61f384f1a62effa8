"""`arbor serve` on a free loopback port with the default model, driven by the official `openai` client
(streaming and not, chat and completions) and by raw HTTP for the error cases, the queue limit, a
client that leaves mid-stream, and a conversation that reuses its KV prefix."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France? Answer in one sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *args, home):
    port = free_port()
    env = {**os.environ, "ARBOR_HOME": str(home), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arbor_cli", "serve", "--model", str(checkpoint.path),
                             "--port", str(port), *args], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"arbor serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("arbor serve did not start")


@pytest.fixture(scope="module")
def server(default_checkpoint, tmp_path_factory):
    """One server for the module: a 4,096-token context, one request at a time (--parallel 1: the queue's tests
    and answers byte for byte those of `arbor chat`; tests/test_serve_batch.py serves several at once), one
    request may wait beside the running one."""
    proc, url = start_server(default_checkpoint, "--context", "4096", "--queue-size", "1", "--parallel", "1",
                             home=tmp_path_factory.mktemp("serve-home"))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def forget(client):
    """An unrelated request: the server's cache no longer holds the previous prompt, so the next request is
    computed afresh (a prompt that extends the cached one prefills only its new tokens, and on the CPU's int4
    path a prefill of 1 token rounds differently from one of 40: a near-tie can go the other way)."""
    client.completions.create(model="smollm2-135m-instruct", prompt="Unrelated.", max_tokens=1)


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    forget(c)
    return c


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def wait_until_idle(url, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(url)
        if not h["busy"] and h["waiting"] == 0:
            return h
        time.sleep(0.2)
    raise AssertionError(f"the server stayed busy: {health(url)}")


def test_chat_with_the_openai_client_is_arbor_chats_reply(client, default_checkpoint, server):
    reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=64,
                                           messages=[{"role": "user", "content": PROMPT}])
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
    local = subprocess.run([sys.executable, "-m", "arbor_cli", "chat", "--model", str(default_checkpoint.path),
                            "--context", "4096", "--max-tokens", "64"], input=PROMPT + "\n", capture_output=True,
                           text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    assert text.strip() == local.stdout.strip() and "Paris" in text


CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"enum": ["France", "Spain", "Italy"]},
                       "population": {"type": "integer", "minimum": 0, "maximum": 50000000}}}


def test_response_format_json_schema_through_the_openai_client(client):
    pytest.importorskip("llguidance")
    for temperature in (0, 1.0):
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=temperature, seed=3, max_tokens=80,
            messages=[{"role": "user", "content": "Tell me about the capital of France."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
        value = json.loads(reply.choices[0].message.content)
        assert reply.choices[0].finish_reason == "stop"
        assert set(value) == {"city", "country", "population"} and value["country"] in CITY["properties"]["country"][
            "enum"] and isinstance(value["population"], int) and 0 <= value["population"] <= 50000000


def test_every_case_of_the_validity_suite_through_the_openai_clients_response_format(client):
    """The 54 cases of tests/schema_cases.py (strict json_schema, and json_object), each answer judged by
    jsonschema: all parse and validate (the same suite on the backends: tests/test_schema_validity.py)."""
    pytest.importorskip("llguidance")
    pytest.importorskip("jsonschema")
    from schema_cases import MAX_TOKENS, cases, judge

    failed = []
    for c in cases():
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": c.prompt}],
            temperature=c.temperature, seed=c.seed, max_tokens=MAX_TOKENS, response_format=c.response_format)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        if finish != "stop" or judge(text, c.schema) != "valid":
            failed.append((c.name, finish, text))
    assert failed == []


def test_an_unsupported_response_format_is_a_400_naming_it(server):
    pytest.importorskip("llguidance")
    for response_format in ({"type": "xml"}, {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "format": "shoe-size"}}}):
        r = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Hi"}], "response_format": response_format})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_streamed_chat_gives_the_same_text_piece_by_piece(client):
    plain = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": "Name three colours."}])
    forget(client)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "Name three colours."}]) if c.choices]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == plain.choices[0].message.content


def test_completions_streamed_and_not(client):
    done = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8,
                                     temperature=0, stop=["."])
    forget(client)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."],
        stream=True))
    assert "Paris" in done.choices[0].text and streamed == done.choices[0].text and "." not in streamed


def test_seeded_sampling_repeats_and_top_p_is_accepted(client):
    ask = dict(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9,
               seed=7)
    first = client.completions.create(**ask).choices[0].text
    forget(client)
    assert client.completions.create(**ask).choices[0].text == first


def test_models_and_health(client, server):
    [model] = client.models.list().data
    assert model.id == "smollm2-135m-instruct" and model.model_extra["max_model_len"] == 4096
    assert health(server)["status"] == "ok"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, None),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"messages": []}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "n": 2}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9000}).encode(), 400,
     "context_length_exceeded"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, code):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code


def test_an_unknown_route_and_a_wrong_method_are_errors_too(server):
    assert httpx.get(f"{server}/v1/nothing", timeout=5).status_code == 404
    r = httpx.get(f"{server}/v1/chat/completions", timeout=5)
    assert r.status_code == 405 and "error" in r.json()


def test_a_full_queue_answers_503_and_loses_nothing(server):
    wait_until_idle(server)
    long = {"prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    results = {}

    def post(name):
        results[name] = httpx.post(f"{server}/v1/completions", json=long, timeout=300)

    running = threading.Thread(target=post, args=("running",))
    running.start()
    deadline = time.time() + 30
    while not health(server)["busy"] and time.time() < deadline:
        time.sleep(0.05)
    waiting = threading.Thread(target=post, args=("waiting",))
    waiting.start()
    while health(server)["waiting"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    refused = httpx.post(f"{server}/v1/completions", json=long, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    running.join()
    waiting.join()
    assert results["running"].status_code == results["waiting"].status_code == 200
    assert results["running"].json()["usage"]["completion_tokens"] == 300  # both ran to the end, in turn
    assert results["waiting"].json()["choices"][0]["text"] == results["running"].json()["choices"][0]["text"]


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    before = wait_until_idle(server)
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.time()
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in seen)
    after = wait_until_idle(server, timeout=20)
    assert after["cancelled"] == before["cancelled"] + 1
    assert time.time() - t0 < 20  # 3,000 tokens would take far longer on this machine


def test_a_conversation_that_goes_on_reuses_its_kv_prefix(client, server):
    story = " ".join(f"On day {i} the keeper lit the lamp at dusk and put it out at dawn." for i in range(60))
    first = [{"role": "user", "content": f"{story}\nMy name is Ada. Remember it."}]  # > 512 tokens: a whole chunk
    reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                           messages=first)
    before = health(server)["reused_tokens"]
    follow = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "What is my name?"}]
    again = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                           messages=follow)
    assert again.choices[0].message.content
    reused = health(server)["reused_tokens"] - before
    assert reply.usage.prompt_tokens - 512 < reused <= reply.usage.prompt_tokens  # the first turn's whole chunks


def test_echo_with_logprobs_scores_the_prompt(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "The capital of France is Paris", "echo": True,
                                                     "logprobs": 0, "max_tokens": 1}, timeout=60).json()
    logprobs = r["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) > 4
    assert all(v <= 0 for v in logprobs["token_logprobs"][1:]) and logprobs["token_logprobs"][-1] > -3  # " Paris"


def test_an_api_key_is_required_when_given_and_binding_elsewhere_without_one_warns(default_checkpoint, tmp_path):
    proc, url = start_server(default_checkpoint, "--api-key", "s3cret", "--context", "4096", home=tmp_path)
    try:
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert ok.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    port = free_port()
    open_proc = subprocess.Popen([sys.executable, "-m", "arbor_cli", "serve", "--model", str(default_checkpoint.path),
                                  "--host", "0.0.0.0", "--port", str(port)], stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "ARBOR_HOME": str(tmp_path), "NO_COLOR": "1"})
    try:
        line = open_proc.stderr.readline()
        assert "without --api-key" in line
    finally:
        open_proc.terminate()
        open_proc.wait(timeout=30)
