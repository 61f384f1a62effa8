"""`arbor serve --parallel N` (serve/worker.py's BatchWorker) over loopback with a tiny random torch model:
parallel requests are decoded together and each answered as it would be alone, a client that leaves frees
its slot for a waiting request at once, and past the N running and the queue a request is refused 503."""

import socket
import threading
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from arbor_cli.serve import Server  # noqa: E402
from arbor_cli.serve.app import create_app  # noqa: E402

CHUNK = 8


class IdsTokenizer:
    """Token ids shown as "w<id> "; text is its words' ids (each word's characters summed)."""

    eos_ids = [0]
    chat_template = "words"

    def encode(self, text, add_special_tokens=False):
        return [3 + sum(map(ord, w)) % 90 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1] + [i for m in messages for i in self.encode(m["content"])] + [2]

    def decode(self, ids):
        return "".join(f"w{i} " for i in ids)

    def stream_decoder(self):
        return SimpleNamespace(push=lambda token: f"w{token} ", flush=lambda: "")


@pytest.fixture
def model(tiny_checkpoint):
    import arbor_torch

    from arbor_cli.model import Model

    checkpoint = tiny_checkpoint(max_position_embeddings=4096)
    return Model(checkpoint, arbor_torch.load(checkpoint, "cpu", "float32"), IdsTokenizer(), "torch",
                 context=4096, prefill_chunk=CHUNK)


@pytest.fixture
def serve(model):
    """start(parallel, queue_size) -> the URL of arbor serve's app over `model`, in this process."""
    servers = []

    def start(parallel: int, queue_size: int = 4) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(Server(model, queue_size=queue_size, parallel=parallel))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.should_exit = True


def complete(url: str, prompt: list[int], max_tokens: int, **more) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **more}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def running(url: str, n: int, timeout: float = 10) -> int:
    """How many requests run once `n` do (or `timeout` passed)."""
    deadline = time.time() + timeout
    while (now := health(url)["running"]) < n and time.time() < deadline:
        time.sleep(0.01)
    return now


def test_parallel_requests_run_together_and_each_answer_is_its_own(model, serve):
    url = serve(parallel=3)
    prompts = [list(range(5, 30)), [40, 41], list(range(50, 59)), [60, 61, 62], list(range(70, 82))]
    lengths = [300, 40, 250, 120, 200]
    alone = [model.generate(p, max_new_tokens=n, ignore_eos=True).text for p, n in zip(prompts, lengths)]
    replies: dict[int, httpx.Response] = {}
    seen = []

    def watch():
        while len(replies) < len(prompts):
            seen.append(health(url)["running"])
            time.sleep(0.01)

    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, complete(url, prompts[i], lengths[i])))
               for i in range(len(prompts))]
    watcher = threading.Thread(target=watch)
    for t in threads + [watcher]:
        t.start()
    for t in threads + [watcher]:
        t.join()
    assert [replies[i].status_code for i in range(5)] == [200] * 5
    assert [replies[i].json()["choices"][0]["text"] for i in range(5)] == alone
    assert 2 <= max(seen) <= 3  # decoded together, never more than the slots
    h = health(url)
    assert h["parallel"] == 3 and h["served"] == 5 and h["running"] == 0 and not h["busy"]


def test_a_client_that_leaves_frees_its_slot_for_a_waiting_request_at_once(serve):
    url = serve(parallel=2, queue_size=2)
    long = {"prompt": [5, 6, 7], "max_tokens": 3500, "temperature": 0, "ignore_eos": True}
    stays: dict[str, httpx.Response] = {}
    staying = threading.Thread(target=lambda: stays.__setitem__(
        "r", httpx.post(f"{url}/v1/completions", json=long, timeout=120)))
    staying.start()
    with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        assert running(url, 2) == 2
    t0 = time.time()
    short = complete(url, [9, 10, 11], 5)  # takes the slot the stream left
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 5
    waited = time.time() - t0
    h = health(url)
    assert h["cancelled"] == 1 and h["running"] == 1  # the long one still runs beside
    assert "r" not in stays  # ... and had not ended when the short one was answered
    assert waited < 10
    staying.join()
    assert not health(url)["busy"]
    assert stays["r"].status_code == 200 and stays["r"].json()["usage"]["completion_tokens"] == 3500


def test_the_last_request_leaving_leaves_the_server_idle(serve):
    url = serve(parallel=2)
    body = {"prompt": [5, 6, 7], "max_tokens": 3500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ") and running(url, 1) == 1
    deadline = time.time() + 10
    while health(url)["busy"] and time.time() < deadline:
        time.sleep(0.02)
    h = health(url)
    assert not h["busy"] and h["running"] == 0 and h["cancelled"] == 1


def test_beyond_the_slots_the_queue_then_503(serve):
    url = serve(parallel=2, queue_size=1)
    long = {"prompt": [5, 6, 7], "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as a, \
            httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as b:
        lines = a.iter_lines(), b.iter_lines()  # kept: an iterator dropped mid-way closes its connection
        assert all(next(each).startswith("data: ") for each in lines)
        assert running(url, 2) == 2
        waiting = threading.Thread(target=lambda: complete(url, [8, 9], 3000))
        waiting.start()
        deadline = time.time() + 10
        while health(url)["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        refused = complete(url, [8, 9], 3)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    waiting.join()
    h = health(url)
    assert h["refused"] == 1 and h["cancelled"] == 2 and h["served"] == 1


def test_a_request_longer_than_a_slot_is_refused_up_front(serve):
    url = serve(parallel=2)
    too_long = complete(url, list(range(1, 60)) * 80, 5)  # 4,720 tokens: more than a 4,096-token slot
    assert too_long.status_code == 400


def test_the_default_parallel_is_the_planners_batch_and_a_named_one_shrinks_the_slots_to_fit(model):
    from arbor_core.planner import MAX_BATCH

    default = Server(model, parallel=None)
    assert default.parallel == model.batch_size(default.max_context) and 1 <= default.parallel <= MAX_BATCH
    assert default.max_context == 4096  # the model's --context, every slot's
    named = Server(model, parallel=3)
    assert named.parallel == 3 and named.worker.batch.slots == 3 and named.health()["parallel"] == 3
