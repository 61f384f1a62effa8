"""ChatSession: a conversation whose context survives between turns, on any door.

Each turn renders the whole history through the model's chat template and hands it to the door with
the conversation's Session (session.py), which reuses what it already holds of it by its one rule and
runs the rest (on an engine the server keeps its own cache). Near the context limit the oldest turns
are dropped (the system prompt stays) and the caller is told.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from arbor_core.errors import ContextError, InputError

from .generate import GenerationOptions, GenerationResult

REPLY_RESERVE = 512  # tokens kept free for the reply when trimming history
SESSION_FORMAT = "arbor-chat/1"


class ChatSession:
    def __init__(self, model, system: str | None = None, options: GenerationOptions | None = None,
                 context: int | None = None):
        self.model = model
        self.options = options or GenerationOptions(max_new_tokens=1024)
        self.system = system
        self.turns: list[dict[str, str]] = []  # user/assistant messages, system excluded
        self.context = context or model.session_context()
        self.session = model.session(self.context)
        self.last_result: GenerationResult | None = None

    # ---- history ------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def tokens_used(self) -> int:
        return self.session.tokens_used()

    def reset(self) -> None:
        self.turns.clear()
        self.session.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    # ---- a turn -------------------------------------------------------------------------
    def send(self, content: str) -> Iterator[str]:
        """Stream the reply to `content`; the turn is recorded even if the caller stops early."""
        self.turns.append({"role": "user", "content": content})
        self._fit_history()
        reply: list[str] = []
        stream = self.model.stream(self.messages, self.options, session=self.session)
        try:
            for piece in stream:
                reply.append(piece)
                yield piece
            self.last_result = stream.result
        finally:
            self.turns.append({"role": "assistant", "content": "".join(reply)})

    def _fit_history(self) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns until it fits with room to reply."""
        limit = self.context - min(self.options.max_new_tokens, REPLY_RESERVE, self.context // 4)
        dropped = 0
        while True:
            ids = self.model.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
            if len(ids) <= limit:
                break
            if len(self.turns) <= 1:
                self.turns.pop()
                raise ContextError(f"the message is {len(ids)} tokens, more than the {limit} this "
                                   f"{self.context}-token context leaves for it; shorten it or raise --context")
            self.turns = self.turns[2:] if self.turns[0]["role"] == "user" and len(self.turns) > 2 else self.turns[1:]
            dropped += 1
        if dropped:
            self.model.notify(f"conversation reached the {self.context}-token context: dropped the oldest "
                              f"{dropped} exchange(s)")
        return ids

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON, atomically: a failed write leaves any old file intact."""
        path = Path(path)
        payload = json.dumps({"format": SESSION_FORMAT, "system": self.system, "messages": self.turns},
                             ensure_ascii=False, indent=2)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload + "\n")
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno is not None:  # name the user's file, not the hidden temp one
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise

    def load(self, path: str | Path) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not a saved arbor chat ({e})") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)
        if not valid or data.get("format") != SESSION_FORMAT:
            raise InputError(f"{path} is not a saved arbor chat (expected {SESSION_FORMAT} JSON)")
        if data.get("system") is not None and not isinstance(data["system"], str):  # the whole file, not only turns
            raise InputError(f"{path} is not a saved arbor chat: its system prompt is a "
                             f"{type(data['system']).__name__}, not text")
        self.system = data.get("system") or None
        self.turns = [dict(role=m["role"], content=m["content"]) for m in messages]
        self.session.clear()


def new_session(model, system: str | None = None, options: GenerationOptions | None = None) -> ChatSession:
    """A ChatSession, or the error that says the model has no chat template."""
    if model.tokenizer.chat_template is None:
        from arbor_core.chat_template import cannot_chat

        raise cannot_chat(model.checkpoint.name)
    return ChatSession(model, system=system, options=options)
