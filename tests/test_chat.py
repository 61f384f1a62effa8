"""ChatSession (arbor_cli/chat.py): prefix reuse across turns, dropping old turns, save and load."""

import pytest
from conftest import FakeModel

from arbor_cli.chat import ChatSession
from arbor_cli.generate import GenerationOptions


@pytest.mark.slow
def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_session(default_model):
    opts = GenerationOptions(max_new_tokens=24)
    session = ChatSession(default_model, options=opts, context=4096)
    "".join(session.send("Name a fruit that is yellow."))
    history_tokens = session.tokens_used()
    second = "".join(session.send("And one that is red?"))
    prefilled = session.last_result.timings["prompt_tokens"]
    full = len(default_model.tokenizer.encode_chat(session.messages[:-1]))
    # only the new turn, plus the few tokens where the re-rendered last reply differs from what was generated
    assert prefilled <= full - history_tokens + 8 and prefilled < full / 2
    fresh = ChatSession(default_model, options=opts, context=4096)
    fresh.turns = session.turns[:2]
    assert "".join(fresh.send("And one that is red?")) == second


@pytest.mark.slow
def test_long_conversation_drops_oldest_turns_and_keeps_the_system_prompt(default_model):
    notices = []
    default_model.notify = notices.append
    try:
        session = ChatSession(default_model, system="You are terse.", options=GenerationOptions(max_new_tokens=16, ignore_eos=True),
                              context=256)
        for i in range(10):
            "".join(session.send(f"Tell me fact number {i} about the ocean, please, in detail."))
        assert session.messages[0] == {"role": "system", "content": "You are terse."}
        assert session.tokens_used() <= 256
        assert any("dropped the oldest" in n for n in notices)
    finally:
        default_model.notify = lambda message: None


def test_session_save_and_load_roundtrip(tmp_path):
    s = ChatSession(FakeModel(context=4096), system="sys")
    s.turns = [{"role": "user", "content": "hi ✓"}, {"role": "assistant", "content": "hello"}]
    s.save(tmp_path / "chat.json")
    t = ChatSession(FakeModel(context=4096))
    t.load(tmp_path / "chat.json")
    assert t.system == "sys" and t.turns == s.turns


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    s = ChatSession(FakeModel(context=4096))
    target = tmp_path / "chat.json"
    target.write_text("precious")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        s.save(target)
    assert target.read_text() == "precious" and len(list(tmp_path.iterdir())) == 1
