"""ChatSession (arbor_cli/chat.py): prefix reuse across turns, dropping old turns, save and load."""

from types import SimpleNamespace

import pytest
from conftest import FakeModel

from arbor_cli.chat import ChatSession
from arbor_cli.generate import GenerationOptions


def second_turn(model, opts) -> SimpleNamespace:
    """A conversation's second reply, with what its turns held, prefilled and reused, and a fresh session's reply."""
    session = ChatSession(model, options=opts, context=4096)
    "".join(session.send("Name a fruit that is yellow."))
    history_tokens = session.tokens_used()
    second = "".join(session.send("And one that is red?"))
    fresh = ChatSession(model, options=opts, context=4096)
    fresh.turns = session.turns[:2]
    return SimpleNamespace(reply=second, history_tokens=history_tokens, reused=session.session.reused,
                           prefilled=session.last_result.timings["prompt_tokens"],
                           full=len(model.tokenizer.encode_chat(session.messages[:-1])),
                           first_prompt=len(model.tokenizer.encode_chat(session.messages[:1])),
                           fresh=fresh, fresh_reply="".join(fresh.send("And one that is red?")))


@pytest.mark.slow
def test_on_the_cpu_int4_default_a_second_turn_reuses_whole_chunks_and_is_a_fresh_sessions_reply(default_checkpoint):
    """Torch's CPU kernels round differently for 30 rows than for 16 (session.py): a turn keeps only the
    whole prefill chunks of the first prompt, across a chunk boundary here (chunks of 16), and its greedy
    reply is a fresh session's byte for byte."""
    import arbor_cli

    model = arbor_cli.load(str(default_checkpoint.path), backend="torch", device="cpu", quiet=True)
    assert model.lm.quantize == "int4" and not model.lm.exact_across_row_counts
    model.prefill_chunk = 16
    turn = second_turn(model, GenerationOptions(max_new_tokens=24))
    assert turn.reused == turn.first_prompt // 16 * 16 >= 32 and turn.prefilled == turn.full - turn.reused
    assert turn.reply == turn.fresh_reply


@pytest.mark.slow
def test_where_row_counts_change_nothing_a_second_turn_prefills_only_its_own_tokens(default_checkpoint):
    pytest.importorskip("mlx.core")
    import arbor_cli

    model = arbor_cli.load(str(default_checkpoint.path), backend="mlx", device="cpu", quiet=True)
    assert model.lm.exact_across_row_counts  # measured: MLX on the CPU computes a position alike for any rows
    turn = second_turn(model, GenerationOptions(max_new_tokens=24))
    # only the new turn, plus the few tokens where the re-rendered last reply differs from what was generated
    assert turn.prefilled <= turn.full - turn.history_tokens + 8 and turn.prefilled < turn.full / 2
    assert turn.reply == turn.fresh_reply


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
