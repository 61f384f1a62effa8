"""The door's contract (arbor_core/door.py), run over its three implementations, as the backend
contract runs over the backends: Model on a tiny random checkpoint (torch on the CPU, prefill chunks of
8 so that a conversation crosses chunk boundaries), RemoteModel against `arbor serve`'s app serving that
same Model in this process, and the tests' FakeModel."""

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import FakeModel

from arbor_cli.generate import GenerationOptions
from arbor_core.door import Door
from arbor_core.errors import OutOfMemoryError
from arbor_core.planner import ContextPlan

CHUNK = 8
GREEDY = GenerationOptions(max_new_tokens=6, ignore_eos=True)
FIRST = [{"role": "user", "content": "one two three four five six seven"}]


class IdTokenizer:
    """A word a token: word i of the text is id 3 + (its hash mod 90), shown as w<id>; chat adds ids 1 and 2."""

    eos_ids: list[int] = []
    chat_template = "words"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + sum(map(ord, w)) % 90 for w in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        ids = []
        for m in messages:
            ids += [1] + self.encode(m["content"]) + [2]
        return ids + ([1] if add_generation_prompt else [])

    def decode(self, ids: list[int]) -> str:
        return "".join(f"w{i} " for i in ids)

    def stream_decoder(self):
        return SimpleNamespace(push=lambda token: f"w{token} ", flush=lambda: "")


def local_model(tiny_checkpoint):
    import arbor_torch

    from arbor_cli.model import Model

    checkpoint = tiny_checkpoint(max_position_embeddings=4096)
    return Model(checkpoint, arbor_torch.load(checkpoint, "cpu", "float32"), IdTokenizer(), "torch",
                 prefill_chunk=CHUNK)


def served(model):
    """RemoteModel over arbor serve's app (uvicorn in a thread) serving `model`; the server, to stop."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from arbor_cli.engine import RemoteModel
    from arbor_cli.serve import Server
    from arbor_cli.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Server(model)), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return RemoteModel(f"http://127.0.0.1:{port}", model.checkpoint, model.tokenizer), server


@pytest.fixture(params=["model", "remote", "fake"])
def door(request, tiny_checkpoint):
    if request.param == "fake":
        yield FakeModel(tokenizer=IdTokenizer(), answer=lambda prompt: "an answer")
        return
    model = local_model(tiny_checkpoint)
    if request.param == "model":
        yield model
        return
    remote, server = served(model)
    yield remote
    server.should_exit = True


def test_every_door_is_a_door(door):
    assert isinstance(door, Door)


def test_a_plan_holds_what_is_needed_and_honours_a_requested_context(door):
    plan = door.plan(100)
    assert isinstance(plan, ContextPlan) and plan.context >= 100 and plan.needed_tokens == 100
    assert door.plan(100, requested=2048).context == 2048
    assert door.session_context() >= 1 and door.session().context == door.session_context()


def test_a_stream_yields_the_result_text_for_messages_and_for_ids(door):
    for prompt in (FIRST, door.tokenizer.encode("eight nine ten")):
        stream = door.stream(prompt, GREEDY)
        assert "".join(stream) == stream.result.text != ""


def test_several_prompts_at_once_answer_each_as_it_is_answered_alone(door):
    prompts = [FIRST, door.tokenizer.encode("eight nine ten"), [{"role": "user", "content": "one two"}]]
    options = [GREEDY, GenerationOptions(max_new_tokens=3, ignore_eos=True), GREEDY]
    alone = []
    for prompt, o in zip(prompts, options):
        stream = door.stream(prompt, o)
        alone.append(("".join(stream), stream.result.tokens))
    texts, results = ["", "", ""], {}
    for event in door.stream_many(prompts, options, parallel=2):
        texts[event.index] += event.text
        if event.result is not None:
            results[event.index] = event.result
    assert [(texts[i], results[i].tokens) for i in range(3)] == alone


def test_scores_are_log_probabilities_of_every_token_after_the_first_and_follow_a_session(door):
    ids = door.tokenizer.encode("one two three four five six seven eight nine ten eleven twelve")
    alone = door.score_prompt(ids)
    assert len(alone) == len(ids) - 1 and all(v <= 0 for v in alone)
    session = door.session(256)
    door.prefill(ids[:5], session)
    after = door.score_prompt(ids[5:], session)
    assert session.ids == ids
    assert after == pytest.approx(alone[5:], abs=1e-3)  # the same kernels, rows split differently


def test_a_session_reuses_what_it_holds_and_answers_as_a_fresh_one(door):
    session = door.session(256)
    first = "".join(door.stream(FIRST, GREEDY, session=session))
    second_turn = [*FIRST, {"role": "assistant", "content": first},
                   {"role": "user", "content": "eight nine ten eleven twelve thirteen"}]
    second = "".join(door.stream(second_turn, GREEDY, session=session))
    assert session.reused % session.grain == 0
    if session.cache is not None:  # a model here: whole chunks of the first prompt were kept
        assert session.reused == len(door.tokenizer.encode_chat(FIRST)) // CHUNK * CHUNK > 0
    assert second == "".join(door.stream(second_turn, GREEDY, session=door.session(256)))


def test_map_gives_results_in_order_and_says_each_is_done(door):
    done = []
    assert list(door.map(lambda i: i * i, range(7), lambda: done.append(1))) == [i * i for i in range(7)]
    assert len(done) == 7


def test_out_of_memory_retries_one_bucket_smaller_unless_the_context_was_chosen(door, request):
    error = OutOfMemoryError("out of memory (simulated)")
    if request.node.callspec.params["door"] == "remote":
        with pytest.raises(OutOfMemoryError):  # an engine: the server's memory is its own business
            door.smaller_context(error, 8192)
        return
    assert door.smaller_context(error, 8192) == 4096
    with pytest.raises(OutOfMemoryError):
        door.smaller_context(error, 8192, pinned=True)
    with pytest.raises(OutOfMemoryError):
        door.smaller_context(error, 4096)
