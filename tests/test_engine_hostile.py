"""--engine against hostile servers (issue 31): one that hangs or trickles is bounded by --engine-timeout, with
progress on stderr while it waits and one clear line at the end; an answer that is not what OpenAI's API
says is an EngineError and is never kept in the answer log, so a rerun after the server is fixed succeeds."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from arbor_cli import engine
from arbor_cli.engine import EngineError, RemoteModel
from conftest import FakeTokenizer

HI = [{"role": "user", "content": "Hi"}]
GOOD = {"choices": [{"message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}]}


def serve(answer_post, stop: threading.Event):
    """A server whose /v1/models lists one model and whose POSTs `answer_post(handler, body)` answers."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_json(self, body, status=200):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send_json({"object": "list", "data": [{"id": "fake", "max_model_len": 4096}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                answer_post(self, body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def server():
    stop, servers = threading.Event(), []

    def start(answer_post):
        httpd, url = serve(answer_post, stop)
        servers.append(httpd)
        return url

    start.stop = stop
    yield start
    stop.set()
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(engine, "BACKOFF_S", 0.05)
    monkeypatch.setattr(engine, "PROGRESS_S", 0.3, raising=False)


def remote(url, tmp_path, **kw) -> RemoteModel:
    checkpoint = SimpleNamespace(config=SimpleNamespace(trained_context=4096), name="fake", path=tmp_path)
    return RemoteModel(url, checkpoint, FakeTokenizer(), answer_log=tmp_path / "answers.jsonl", **kw)


def test_a_server_that_hangs_is_given_up_within_the_total_bound_with_progress_said(server, tmp_path):
    url = server(lambda handler, body: server.stop.wait(30))  # never answers
    heard = []
    model = remote(url, tmp_path, timeout=0.8, notify=heard.append)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as e:
        model.chat(HI)
    took = time.monotonic() - t0
    assert 1.5 < took < 3.0  # two timeouts in all (was 600 s a try x 4 tries)
    assert str(e.value).startswith(f"cannot reach the engine at {url}/v1 (no answer within 0.8 s) after 2 tries in ")
    assert str(e.value).endswith("(--engine-timeout 0.8)") and "\n" not in str(e.value)
    waiting = [h for h in heard if h.startswith("waiting for the engine")]
    assert waiting and f"waiting for the engine at {url}/v1 (/chat/completions)" in waiting[0]
    assert not (tmp_path / "answers.jsonl").exists()


def test_a_server_that_trickles_its_head_is_cut_off_within_the_total_bound(server, tmp_path):
    """The status line and headers a byte every 0.1 s: the socket's own timeout restarts with each byte."""
    def trickle_head(handler, body):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
            if server.stop.wait(0.1):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    url = server(trickle_head)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"no answer within 0.8 s\) after 2 tries"):
        remote(url, tmp_path, timeout=0.8).chat(HI)
    assert time.monotonic() - t0 < 4.0


def test_a_server_that_trickles_its_answer_is_cut_off(server, tmp_path):
    def trickle(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        while not server.stop.wait(0.1):  # a byte every 0.1 s: a socket's own timeout never fires
            handler.wfile.write(b" ")
            handler.wfile.flush()

    url = server(trickle)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"stopped answering /chat/completions: its answer did not come whole "
                                          r"within 0.8 s \(--engine-timeout\)"):
        remote(url, tmp_path, timeout=0.8).chat(HI)
    assert time.monotonic() - t0 < 2.5


def event_stream(handler) -> None:
    """The head of a server-sent-events answer."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()


def test_a_stream_that_trickles_without_ending_a_line_is_cut_off(server, tmp_path):
    def trickle(handler, body):
        event_stream(handler)
        handler.wfile.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        handler.wfile.flush()
        while not server.stop.wait(0.1):
            handler.wfile.write(b"x")
            handler.wfile.flush()

    url = server(trickle)
    pieces = []
    with pytest.raises(EngineError, match="stopped answering /completions"):
        for piece in remote(url, tmp_path, timeout=0.8).generate([1, 2, 3], stream=True):
            pieces.append(piece)
    assert pieces == ["a"]


@pytest.mark.parametrize("answer, says", [
    ({"choices": [{"message": {"content": 5}}]}, "whose message content is not text (5)"),
    ({"choices": [{"message": {"content": ["a"]}, "finish_reason": "stop"}]}, 'content is not text (["a"])'),
    ({"choices": [{"message": "Hello"}]}, "content is not text"),
    ({"choices": [{"message": {"content": "ok"}, "finish_reason": 7}]}, "finish_reason that is not text (7)"),
])
def test_a_malformed_answer_is_one_line_never_kept_and_asked_again_once_the_server_is_fixed(server, tmp_path, answer,
                                                                                           says):
    fixed = threading.Event()
    url = server(lambda handler, body: handler.send_json(GOOD if fixed.is_set() else answer))
    with pytest.raises(EngineError) as e:
        remote(url, tmp_path).chat(HI)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "answers.jsonl").exists() or (tmp_path / "answers.jsonl").read_text() == ""
    fixed.set()
    assert remote(url, tmp_path).chat(HI).text == "Hello."


def test_an_answer_log_holding_a_malformed_answer_asks_again(server, tmp_path):
    from arbor_cli.answer_log import AnswerLog

    url = server(lambda handler, body: handler.send_json(GOOD))
    model = remote(url, tmp_path)
    body = {"model": "fake", "messages": HI, "max_tokens": 256, "temperature": 0.0, "top_p": 1.0}
    with open(tmp_path / "answers.jsonl", "w") as f:  # what an older arbor kept
        f.write(json.dumps({"key": AnswerLog.key(body), "answer": {"text": 5, "finish_reason": "stop"}}) + "\n")
    assert model.chat(HI).text == "Hello."


def test_a_streamed_piece_that_is_not_text_is_one_line(server, tmp_path):
    def stream(handler, body):
        event_stream(handler)
        handler.wfile.write(b'data: {"choices": [{"text": 12}]}\n\ndata: [DONE]\n\n')

    url = server(stream)
    with pytest.raises(EngineError, match=r"streamed a piece that is not text \(12\)"):
        remote(url, tmp_path).generate([1, 2, 3])


@pytest.mark.slow
def test_summarize_on_a_hanging_engine_says_it_waits_then_one_error_line(server, tmp_path, default_checkpoint):
    from typer.testing import CliRunner

    from arbor_cli.cli import app

    url = server(lambda handler, body: server.stop.wait(30))
    (tmp_path / "doc.txt").write_text("The keeper lit the lamp at dusk and put it out at dawn.\n")
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["summarize", str(tmp_path / "doc.txt"), "--engine", url, "--engine-timeout", "1",
                                 "--model", str(default_checkpoint.path)], env={"NO_COLOR": "1"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.stderr and time.monotonic() - t0 < 10
    assert lines[-1].startswith(f"arbor: error: cannot reach the engine at {url}/v1 (no answer within 1 s) after 2 "
                                "tries in ") and lines[-1].endswith(" s (--engine-timeout 1)"), r.stderr
    assert any(line.startswith(f"arbor: waiting for the engine at {url}/v1") for line in lines[:-1]), r.stderr
    r = CliRunner().invoke(app, ["summarize", str(tmp_path / "doc.txt"), "--engine", url, "--engine-timeout", "nan"])
    assert r.exit_code == 2 and r.stderr.strip() == "arbor: error: --engine-timeout must be a number above 0, got nan"
