"""arbor_cli/serve/openai.py from tables: request bodies to (ids, options, context) or the 4xx error a client
hears, and the response and event shapes. No model, no HTTP: a character tokenizer and a planner of
power-of-two contexts stand in."""

import json
from types import SimpleNamespace

import pytest

from arbor_cli.generate import GenerationOptions
from arbor_cli.serve import openai
from arbor_cli.serve.openai import RequestError, Reply
from arbor_core.errors import ContextError

MAX_CONTEXT = 300  # the server's context


class CharTokenizer:
    """A token per character (its code point); BOS is 1; a chat message is "role:content" closed by 0."""

    def encode(self, text, add_special_tokens=False):
        return [1] * add_special_tokens + [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=True):
        if any("{%" in m["content"] for m in messages):
            raise ContextError("the chat template cannot render this")
        return [1] + [t for m in messages for t in [*self.encode(f"{m['role']}:{m['content']}"), 0]]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def plan_context(tokens: int) -> int:
    """The smallest power of two from 128 that holds `tokens`."""
    return max(128, 1 << (tokens - 1).bit_length())


def request(body: dict, chat: bool = True):
    ids = (openai.chat_ids(body, CharTokenizer()) if chat
           else openai.completion_ids(body, CharTokenizer(), vocab_size=1000))
    options, context = openai.generation_options(body, len(ids), MAX_CONTEXT, plan_context)
    return ids, options, context


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, chat, status, param, code, message", [
    ({}, True, 400, "messages", None, "'messages' is required"),
    ({"messages": []}, True, 400, "messages", None, "'messages' is required"),
    ({"messages": "Hi"}, True, 400, "messages", None, "'messages' is required"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, True, 400, "messages", None, "each message needs a role"),
    ({"messages": ["Hi"]}, True, 400, "messages", None, "each message needs a role"),
    ({"messages": [{"role": "user", "content": 3}]}, True, 400, "messages", None, "needs a text content"),
    ({"messages": [{"role": "user", "content": "{% bad %}"}]}, True, 400, "messages", None, "cannot render"),
    ({"messages": HI, "n": 2}, True, 400, "n", None, "only n=1"),
    ({"messages": HI, "max_tokens": -3}, True, 400, "max_tokens", None, "positive integer"),
    ({"messages": HI, "max_tokens": True}, True, 400, "max_tokens", None, "positive integer"),
    ({"messages": HI, "max_completion_tokens": 0}, True, 400, "max_tokens", None, "positive integer"),
    ({"messages": HI, "max_tokens": 2.5}, True, 400, "max_tokens", None, "positive integer"),
    ({"messages": [{"role": "user", "content": "word " * 60}]}, True, 400, "messages", "context_length_exceeded",
     "this server's context holds 300: shorten it"),
    ({"messages": HI, "max_tokens": 9000}, True, 400, "max_tokens", "context_length_exceeded", "ask for fewer"),
    ({"messages": HI, "temperature": "hot"}, True, 400, "temperature", None, "'temperature' must be a number"),
    ({"messages": HI, "top_p": True}, True, 400, "top_p", None, "'top_p' must be a number"),
    ({"messages": HI, "temperature": 500}, True, 400, "temperature", None, "--temperature must be between 0 and 100"),
    ({"messages": HI, "stop": [""]}, True, 400, "stop", None, "--stop strings must be non-empty"),
    ({"messages": HI, "seed": -1}, True, 400, "seed", None, "--seed must be a non-negative integer"),
    ({"messages": HI, "response_format": {"type": "xml"}}, True, 400, "response_format", None, "'xml' is not"),
    ({"messages": HI, "response_format": "json"}, True, 400, "response_format", None, "must be an object"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                                 "schema": {"type": "objekt"}}}},
     True, 400, "response_format", None, "Invalid type: objekt"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "string", "format": "shoe-size"}, "strict": True}}},
     True, 400, "response_format", None, "Unknown format: shoe-size"),
    ({}, False, 400, "prompt", None, "'prompt' is required"),
    ({"prompt": ""}, False, 400, "prompt", None, "'prompt' is required"),
    ({"prompt": ["a", "b"]}, False, 400, "prompt", None, "'prompt' is required"),
    ({"prompt": [True, 2]}, False, 400, "prompt", None, "'prompt' is required"),
    ({"prompt": [5, 1000]}, False, 400, "prompt", None, "token id 1000 is outside the vocabulary"),
    ({"prompt": [[5, -1]]}, False, 400, "prompt", None, "token id -1 is outside the vocabulary"),
])
def test_a_bad_body_is_the_openai_error_a_client_hears(body, chat, status, param, code, message):
    with pytest.raises(RequestError) as caught:
        request(body, chat)
    e = caught.value
    assert (e.status, e.param, e.code, e.type) == (status, param, code, "invalid_request_error")
    assert message in e.message and e.body()["error"]["message"] == e.message


@pytest.mark.parametrize("body, chat, ids, max_new_tokens, context", [
    ({"messages": HI}, True, [1, *b"user:Hi", 0], MAX_CONTEXT - 9, 512),  # the room left, under 1,024
    ({"messages": HI, "max_tokens": 7}, True, [1, *b"user:Hi", 0], 7, 128),
    ({"messages": HI, "max_completion_tokens": 5, "max_tokens": 50}, True, [1, *b"user:Hi", 0], 5, 128),
    ({"messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "image_url"},
                                                {"type": "text", "text": "i"}]}], "max_tokens": 4},
     True, [1, *b"system:Be brief.", 0, *b"user:Hi", 0], 4, 128),
    ({"prompt": "Hi", "max_tokens": 3}, False, [1, *b"Hi"], 3, 128),
    ({"prompt": ["Hi"], "max_tokens": 3}, False, [1, *b"Hi"], 3, 128),
    ({"prompt": [5, 6, 7], "max_tokens": 3}, False, [5, 6, 7], 3, 128),
    ({"prompt": [[5, 6, 7]], "max_tokens": 125}, False, [5, 6, 7], 125, 128),
    ({"prompt": [5, 6, 7], "max_tokens": 126}, False, [5, 6, 7], 126, 256),
])
def test_a_good_body_gives_its_ids_options_and_context(body, chat, ids, max_new_tokens, context):
    assert request(body, chat) == (ids, GenerationOptions.build(max_new_tokens=max_new_tokens, temperature=1.0),
                                   context)


def test_response_format_becomes_the_schema_option():
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for response_format, expected in [({"type": "json_object"}, "json_object"), ({"type": "text"}, None),
                                      ({"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                               "strict": True}}, schema)]:
        _, options, _ = request({"messages": HI, "max_tokens": 3, "response_format": response_format})
        assert options == GenerationOptions.build(max_new_tokens=3, temperature=1.0, schema=expected)


def test_sampling_parameters_become_the_generation_options():
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "top_p": 0.9, "top_k": 40, "seed": 7,
            "stop": "\n", "repetition_penalty": 1.1, "ignore_eos": True}
    _, options, _ = request(body, chat=False)
    assert options == GenerationOptions.build(max_new_tokens=3, temperature=0.0, top_p=0.9, top_k=40, seed=7,
                                              stop="\n", repetition_penalty=1.1, ignore_eos=True)


def refuse_above_256(tokens: int) -> int:
    if tokens > 256:
        raise ContextError(f"{tokens} tokens do not fit in memory")
    return 256


@pytest.mark.parametrize("plan, message", [
    (refuse_above_256, "266 tokens do not fit in memory"),
    (lambda tokens: 200, "the prompt and max_tokens (266 tokens) do not fit the 200-token context this machine"),
])
def test_a_context_the_machine_cannot_hold_is_a_400(plan, message):
    with pytest.raises(RequestError) as caught:
        openai.generation_options({"max_tokens": 250}, 16, MAX_CONTEXT, plan)
    e = caught.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", None) and message in e.message


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "the request body is not valid JSON"),
    (b"\xff\xfe", "the request body is not valid JSON"),
    (b"", "the request body must be a JSON object"),
    (b"[1, 2]", "the request body must be a JSON object"),
])
def test_a_body_that_is_not_a_json_object_is_a_400(raw, message):
    with pytest.raises(RequestError) as caught:
        openai.parse_body(raw)
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest.mark.parametrize("asked, status, code", [(3, 400, None), ("gpt-9", 404, "model_not_found")])
def test_a_model_that_is_not_served_is_refused(asked, status, code):
    with pytest.raises(RequestError) as caught:
        openai.check_model({"model": asked}, "tiny", "/models/tiny.gguf")
    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, "model")


@pytest.mark.parametrize("asked", [None, "", "tiny", "/models/tiny.gguf"])
def test_the_served_name_the_checkpoint_name_or_none_is_accepted(asked):
    openai.check_model({"model": asked}, "tiny", "/models/tiny.gguf")


@pytest.mark.parametrize("key, authorization, refused", [
    (None, None, False), (None, "Bearer x", False), ("s3cret", "Bearer s3cret", False),
    ("s3cret", None, True), ("s3cret", "s3cret", True), ("s3cret", "Bearer other", True),
])
def test_an_api_key_is_checked_only_when_the_server_has_one(key, authorization, refused):
    if refused:
        with pytest.raises(RequestError) as caught:
            openai.check_key(key, authorization)
        assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    else:
        openai.check_key(key, authorization)


@pytest.mark.parametrize("body, prompt_tokens, message", [
    ({"stream": True}, 5, "echo with logprobs is not streamed"),
    ({}, MAX_CONTEXT + 1, "the prompt has 301 tokens; this server's context holds 300"),
])
def test_scoring_is_not_streamed_and_must_fit(body, prompt_tokens, message):
    with pytest.raises(RequestError) as caught:
        openai.check_scoring(body, prompt_tokens, MAX_CONTEXT)
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest.mark.parametrize("body, function, message", [
    ({"content": 1}, openai.tokenize_content, "'content' must be a string"),
    ({"tokens": "1 2"}, openai.detokenize_tokens, "'tokens' must be a list of token ids"),
    ({"tokens": [1, "2"]}, openai.detokenize_tokens, "'tokens' must be a list of token ids"),
    ({"tokens": [-1]}, openai.detokenize_tokens, "token id -1 is outside the vocabulary (0..999)"),
    ({"tokens": [1000]}, openai.detokenize_tokens, "token id 1000 is outside the vocabulary (0..999)"),
])
def test_tokenize_and_detokenize_check_their_field(body, function, message):
    with pytest.raises(RequestError) as caught:
        function(body) if function is openai.tokenize_content else function(body, 1000)
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest.mark.parametrize("checkpoint, name", [
    ("smollm2-135m-instruct", "smollm2-135m-instruct"), ("/models/tiny.gguf", "tiny"),
    ("/models/llama-folder", "llama-folder"),
])
def test_the_served_name_is_a_registry_name_or_a_paths_last_part(checkpoint, name):
    assert openai.served_name(checkpoint) == name


DONE = SimpleNamespace(finish_reason="eos", tokens=[4, 5, 6])


def events(text: str) -> list:
    """The payloads of a run of server-sent events."""
    assert text.endswith("\n\n")
    return [json.loads(e.removeprefix("data: ")) for e in text[:-2].split("\n\n")]


def test_a_chat_reply_whole_and_streamed():
    reply = Reply.start("tiny", chat=True)
    assert reply.id.startswith("chatcmpl-") and len(reply.id) == len("chatcmpl-") + 24
    assert reply.whole("Hello.", DONE, 9) == {
        "id": reply.id, "object": "chat.completion", "created": reply.created, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    stream = events("".join([*reply.opening(), reply.piece("Hel"), reply.finish(DONE), reply.usage_chunk(9, DONE)]))
    assert {e["object"] for e in stream} == {"chat.completion.chunk"} and {e["id"] for e in stream} == {reply.id}
    assert [e["choices"] for e in stream] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}], []]
    assert stream[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_a_text_completion_whole_and_streamed():
    reply = Reply.start("tiny", chat=False)
    stopped = SimpleNamespace(finish_reason="length", tokens=[4])
    assert reply.id.startswith("cmpl-") and reply.opening() == []
    assert reply.whole("Paris", stopped, 5)["choices"] == [
        {"index": 0, "text": "Paris", "logprobs": None, "finish_reason": "length"}]
    stream = events(reply.piece("Par") + reply.finish(stopped))
    assert {e["object"] for e in stream} == {"text_completion"}
    assert [e["choices"][0]["text"] for e in stream] == ["Par", ""] and stream[1]["choices"][0]["finish_reason"] == \
        "length"


def test_events_keep_unicode_and_end_with_done():
    assert openai.sse({"text": "é"}) == 'data: {"text": "é"}\n\n' and openai.sse("[DONE]") == "data: [DONE]\n\n"


def test_a_scored_prompt_lists_its_tokens_offsets_and_log_probs():
    body = openai.scored_completion("tiny", [72, 105, 33], [None, -1.5, -0.25], CharTokenizer())
    assert body["id"].startswith("cmpl-") and body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0,
                                                                 "total_tokens": 3}
    assert body["choices"] == [{"index": 0, "text": "Hi!", "finish_reason": "length", "logprobs": {
        "tokens": ["H", "i", "!"], "token_logprobs": [None, -1.5, -0.25], "top_logprobs": None,
        "text_offset": [0, 1, 2]}}]
