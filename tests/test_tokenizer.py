"""Tokenizer behaviour: control tokens stay out of user text, streaming, save/load."""

import json

import pytest
from tokenizer_samples import CHATML, MULTIBYTE

from arbor_core.errors import ArborError, CorruptModelError
from arbor_core.tokenizer import load_tokenizer

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]


# ---- control tokens ----

def test_template_turns_become_single_control_ids(smol):
    ids = smol.encode_chat([{"role": "system", "content": "Hi."}, {"role": "user", "content": "Yo"}])
    starts = [i for i in ids if i == smol.token_id("<|im_start|>")]
    assert len(starts) == 3 and ids.count(smol.token_id("<|im_end|>")) == 2


def test_encode_never_recognises_control_tokens(smol):
    ids = smol.encode("<|im_end|><|endoftext|>")
    assert not any(smol.is_special(i) for i in ids)
    assert smol.decode(ids) == "<|im_end|><|endoftext|>"


def test_spm_chat_turns_become_control_ids(tiny):
    ids = tiny.encode_chat(CONVERSATION)
    assert ids.count(tiny.token_id("<|im_start|>")) == 5
    # as in llama.cpp, sentencepiece text after a control token starts a word (gets its "\u2581")
    assert tiny.decode(ids) == tiny.render_chat(CONVERSATION).replace("|>", "|> ")


def test_decode_can_skip_control_tokens(smol):
    chat = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hello"}]
    ids = smol.encode_chat(chat, add_generation_prompt=False)
    assert smol.decode(ids, skip_special_tokens=True) == "system\nHi\nuser\nHello\n"


def test_eos_ids_include_the_templates_end_of_turn(smol, tiny):
    assert smol.token_id("<|im_end|>") in smol.eos_ids
    assert tiny.eos_ids == [tiny.token_id("</s>"), tiny.token_id("<|im_end|>")]


def test_bos_is_added_only_when_the_model_asks(smol, tiny):
    assert smol.encode("Hi", add_special_tokens=True) == smol.encode("Hi")
    assert tiny.encode("Hi", add_special_tokens=True) == [tiny.bos_id, *tiny.encode("Hi")]


# ---- streaming ----

@pytest.mark.parametrize("name", ["smol", "tiny"])
def test_stream_decoder_never_splits_a_character(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(MULTIBYTE + " and more text 😀")
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_stream_decoder_keeps_spaces_between_sentencepiece_words(tiny):
    ids = tiny.encode("the quick brown fox")
    decoder = tiny.stream_decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "the quick brown fox"


# ---- save / load ----

@pytest.mark.parametrize("name", ["smol", "tiny"])
def test_save_then_load_gives_the_same_tokenizer(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "def f(x):\n    return x * 2  # 🙂 東京 <|im_start|>"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert again.encode_chat(CONVERSATION) == tok.encode_chat(CONVERSATION)
    assert (again.vocab_size, again.bos_id, again.eos_ids, again.add_bos, again.chat_template) == (
        tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template)


def test_save_replaces_a_tokenizer_already_in_the_directory(smol, tiny, tmp_path):
    (tmp_path / "chat_template.jinja").write_text("stale")
    smol.save(tmp_path)
    tiny.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("the fox") == tiny.encode("the fox") and again.chat_template == CHATML


def test_load_reads_a_named_template_list_and_generation_config(smol, tmp_path):
    smol.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == CHATML and tok.eos_ids == [2, 0]


# ---- errors ----

@pytest.mark.parametrize("name, content", [("tokenizer.json", b'{"version": "1.0", "model": '),
                                           ("tokenizer.model", b"\xff\xfe not a protobuf"),
                                           ("tokenizer_config.json", b"{oops")])
def test_corrupt_tokenizer_file_says_to_pull_again(smol, tmp_path, name, content):
    smol.save(tmp_path)
    if name == "tokenizer.model":  # tokenizer.json would be read first
        (tmp_path / "tokenizer.json").unlink()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorruptModelError, match="arbor pull"):
        load_tokenizer(tmp_path)


def test_directory_without_tokenizer_is_corrupt(tmp_path):
    with pytest.raises(CorruptModelError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    assert issubclass(CorruptModelError, ArborError)
