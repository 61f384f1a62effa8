"""OpenAI's API as data: a request body becomes (token ids, GenerationOptions, context), an answer becomes
a response body or a server-sent event. Pure: no HTTP framework, no threads, no model (the tokenizer and
the context planner come in as arguments), so each rule can be tested from a table of bodies.

Every refusal is a RequestError carrying the HTTP status and the OpenAI-style error body.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from arbor_core.errors import ArborError

from ..constrained import schema_from_response_format
from ..generate import GenerationOptions

DEFAULT_MAX_TOKENS = 1024  # when a request gives none: OpenAI's own default is "the room left"
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, type, and the parameter at fault."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests ------------------------------------------------------------------------------
def check_key(api_key: str | None, authorization: str | None) -> None:
    if api_key is not None and authorization != f"Bearer {api_key}":
        raise RequestError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")


def parse_body(raw: bytes) -> dict:
    """The request's JSON object (an empty body reads as JSON null, which is not an object)."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def check_model(body: dict, name: str, checkpoint_name: str) -> None:
    """A request may name the model by its served name or its checkpoint's name, or not at all."""
    asked = body.get("model")
    if asked is not None and not isinstance(asked, str):
        raise RequestError(400, "'model' must be a string", param="model")
    if asked and asked not in (name, checkpoint_name):
        raise RequestError(404, f"the model '{asked}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")


NUMBERS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
WHOLE_NUMBERS = {"top_k": 0, "seed": 0, "n": 1, "max_tokens": 1, "max_completion_tokens": 1}  # -> the least allowed
SWITCHES = ("stream", "ignore_eos", "echo")
# GenerationOptions names each refusal by the CLI option and, where it differs, the API's name in parentheses
OPTION_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop")


def check_parameters(body: dict) -> None:
    """Every parameter this server reads, checked for its type (and the whole numbers for their least value)
    before anything runs: a 400 naming the parameter, never a 500 from deeper down (`"stop": 123`,
    `"top_k": Infinity`, `"stream_options": "yes"`)."""
    for name in NUMBERS:
        value = body.get(name)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise RequestError(400, f"'{name}' must be a finite number", param=name)
    for name, least in WHOLE_NUMBERS.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise RequestError(400, f"'{name}' must be an integer of at least {least}", param=name)
    for name in SWITCHES:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(400, f"'{name}' must be true or false", param=name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                                   bool)):
        raise RequestError(400, "'stream_options' must be an object such as {\"include_usage\": true}",
                           param="stream_options")
    logprobs = body.get("logprobs")
    if logprobs is not None and not (isinstance(logprobs, bool) or (isinstance(logprobs, int) and logprobs >= 0)):
        raise RequestError(400, "'logprobs' must be true, false or a count of at least 0", param="logprobs")
    if body.get("response_format") is not None and not isinstance(body["response_format"], dict):
        raise RequestError(400, "'response_format' must be an object", param="response_format")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _message_text(content) -> str:
    """A message's content as text: a string, or its list of parts' text parts joined (others are left out)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(400, "each message needs a text content", param="messages")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise RequestError(400, "each content part must be an object with a 'type'", param="messages")
        if part.get("type") != "text":
            continue
        if not isinstance(part.get("text"), str):
            raise RequestError(400, "a text content part's 'text' must be a string", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def chat_ids(body: dict, tokenizer) -> list[int]:
    """The chat prompt's token ids: the messages through the chat template, ready for the answer."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, "each message needs a role of system, user or assistant", param="messages")
        clean.append({"role": m["role"], "content": _message_text(m.get("content"))})
    try:
        return tokenizer.encode_chat(clean, add_generation_prompt=True)
    except ArborError as e:
        raise RequestError(400, str(e), param="messages") from None


def completion_ids(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """The completion prompt's token ids: a string encoded, or token ids taken as they are (one prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
        return prompt
    raise RequestError(400, "'prompt' is required: a non-empty string or list of token ids (one prompt)",
                       param="prompt")


def generation_options(body: dict, prompt_tokens: int, max_context: int,
                       plan_context: Callable[[int], int]) -> tuple[GenerationOptions, int]:
    """The sampling options and the context planned for prompt + answer (400 when they cannot fit).

    `plan_context(tokens)` is the context the machine would run for that many tokens (Model.plan's)."""
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    wanted = _answer_tokens(body, prompt_tokens, max_context)
    try:
        schema = schema_from_response_format(body.get("response_format"))
    except ArborError as e:  # an unsupported schema is refused, never answered unconstrained
        raise RequestError(400, str(e), param="response_format") from None
    try:
        options = GenerationOptions.build(
            max_new_tokens=wanted, temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
            top_k=int(_number(body, "top_k", 0)), seed=body.get("seed"), stop=body.get("stop"),
            repetition_penalty=_number(body, "repetition_penalty", 1.0), ignore_eos=bool(body.get("ignore_eos")),
            schema=schema)
    except ArborError as e:
        said = str(e)
        param = next((n for n in OPTION_PARAMS if f"({n})" in said or said.startswith(f"--{n.replace('_', '-')} ")),
                     None)
        raise RequestError(400, said, param=param) from None
    try:
        context = plan_context(prompt_tokens + wanted)
    except ArborError as e:
        raise RequestError(400, str(e), code="context_length_exceeded") from None
    if prompt_tokens + wanted > context:
        raise RequestError(400, f"the prompt and max_tokens ({prompt_tokens + wanted} tokens) do not fit the "
                           f"{context}-token context this machine can hold", code="context_length_exceeded")
    return options, context


def _answer_tokens(body: dict, prompt_tokens: int, max_context: int) -> int:
    """How many tokens the answer may take: max_tokens as asked, else the default or the room left."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise RequestError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    room = max_context - prompt_tokens
    if room < 1:
        raise RequestError(400, f"the prompt has {prompt_tokens} tokens; this server's context holds "
                           f"{max_context}: shorten it", param="messages", code="context_length_exceeded")
    wanted = min(DEFAULT_MAX_TOKENS, room) if max_tokens is None else max_tokens
    if prompt_tokens + wanted > max_context:
        raise RequestError(400, f"the prompt ({prompt_tokens} tokens) and max_tokens ({wanted}) exceed this "
                           f"server's {max_context}-token context; ask for fewer", param="max_tokens",
                           code="context_length_exceeded")
    return wanted


def check_scoring(body: dict, prompt_tokens: int, max_context: int) -> None:
    """completions with echo + logprobs score the prompt: not streamed, and the prompt must fit."""
    if body.get("stream"):
        raise RequestError(400, "echo with logprobs is not streamed", param="stream")
    if prompt_tokens > max_context:
        raise RequestError(400, f"the prompt has {prompt_tokens} tokens; this server's context holds "
                           f"{max_context}", param="prompt", code="context_length_exceeded")


def tokenize_content(body: dict) -> str:
    content = body.get("content")
    if not isinstance(content, str):
        raise RequestError(400, "'content' must be a string", param="content")
    return content


def detokenize_tokens(body: dict, vocab_size: int) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError(400, "'tokens' must be a list of token ids", param="tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param="tokens")
    return tokens


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number", param=name)
    return float(value)


# ---- responses -----------------------------------------------------------------------------
def served_name(checkpoint_name: str) -> str:
    """The model id clients use: a registry name as it is, a path's last part (without .gguf)."""
    if "/" not in checkpoint_name and "\\" not in checkpoint_name:
        return checkpoint_name
    name = PurePath(checkpoint_name).name
    return name[:-5] if name.endswith(".gguf") else name


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def model_list(name: str, created: int, max_context: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "arbor", "max_model_len": max_context}]}


@dataclass(frozen=True)
class Reply:
    """One chat or text completion's answer, whole or as a stream of chunks, under one id."""

    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def start(cls, model: str, chat: bool) -> Reply:
        return cls(new_id("chatcmpl" if chat else "cmpl"), int(time.time()), model, chat)

    def whole(self, text: str, result, prompt_tokens: int) -> dict:
        """The answer in one body; `result` is the generation's (finish_reason, tokens)."""
        finish = FINISH.get(result.finish_reason, "stop")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(prompt_tokens, len(result.tokens))}

    def opening(self) -> list[str]:
        """What a stream says before the first piece: a chat names the assistant's role."""
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def piece(self, text: str) -> str:
        return self._chunk({"content": text} if self.chat else text)

    def finish(self, result) -> str:
        return self._chunk({} if self.chat else "", FINISH.get(result.finish_reason, "stop"))

    def usage_chunk(self, prompt_tokens: int, result) -> str:
        return sse({**self._head(), "choices": [], "usage": usage(prompt_tokens, len(result.tokens))})

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}

    def _chunk(self, delta_or_text, finish: str | None = None) -> str:
        choice = ({"index": 0, "delta": delta_or_text, "finish_reason": finish} if self.chat
                  else {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish})
        return sse({**self._head(), "choices": [choice]})


def scored_completion(model: str, ids: list[int], scored: list[float | None] | None, tokenizer) -> dict:
    """completions' echo + logprobs answer: the prompt's tokens and their log-probabilities."""
    pieces = [tokenizer.decode([t]) for t in ids]
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    logprobs = {"tokens": pieces, "token_logprobs": scored, "top_logprobs": None, "text_offset": offsets}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model, "usage": usage(len(ids), 0),
            "choices": [{"index": 0, "text": "".join(pieces), "logprobs": logprobs, "finish_reason": "length"}]}
