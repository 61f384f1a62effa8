"""A model's chat template, rendered in a sandbox, with message text shielded from it.

The template is jinja, as HF writes it, run in an immutable sandbox that fails loudly. Message
text is only ever text: before rendering, every control-token spelling inside a message is wrapped
in markers nobody can guess, so the tokenizer finds it again after rendering and spells it out in
ordinary tokens ("<|im_start|>" typed in a prompt cannot forge a chat turn). Finding control-token
spellings in text (control_token_pattern, split_on_control_tokens) lives here for the same reason.

A template is a program from whoever made the model file, so its work is bounded too: at most
RENDER_SECONDS of time (a watchdog thread interrupts the rendering thread; a loop that writes
nothing never yields, so nothing less general catches it), a bounded output (counted as it is
written), and no operation that builds a huge value in one C call (`'x' * 10**9`, `9 ** 9 ** 9`,
widths of millions: template_sandbox.py). check_template runs sample conversations under the same
bounds before a model is installed.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable

from .errors import ConfigError

RENDER_SECONDS = 5.0
OUTPUT_FLOOR_CHARS = 4_000_000  # plus OUTPUT_PER_MESSAGE_CHAR for every character of the messages
OUTPUT_PER_MESSAGE_CHAR = 4

SAMPLE_CONVERSATIONS = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
)


# How a model without a chat template (a base model: Gemma 3 270M) is prompted by arbor's own tasks (summarize,
# ask): each message's text, then a blank line, and the model continues from there. `arbor chat` refuses such a
# model instead: a conversation needs the turns the model was trained on.
PLAIN_PROMPT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n\n{% endfor %}"


class ChatTemplateError(ConfigError):
    """A model without a chat template, or one whose template fails or is refused by the sandbox."""


class ChatTemplateRefusedError(ChatTemplateError):
    """A template that ran past its time or output bound or reached outside the sandbox: hostile or
    broken whatever the conversation, so a model carrying it is not installed."""


def cannot_chat(name: str | None) -> ChatTemplateError:
    return ChatTemplateError(f"{name or 'the model'} has no chat template (a base model), so it cannot chat; use "
                             "`arbor generate` for plain completion (summarize and ask prompt it as plain text)")


def render_template(source: str | None, messages: list[dict], *, add_generation_prompt: bool,
                    bos_token: str, eos_token: str, name: str | None = None) -> str:
    """The conversation as the template `source` writes it; `name` (the model's) is for messages."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.exceptions import SecurityError

    from .template_sandbox import compiled_template

    whose = f"the chat template of {name}" if name else "the model's chat template"
    if not source:
        raise cannot_chat(name)
    limit = output_limit(messages)
    ticket = _watchdog.arm(RENDER_SECONDS)
    try:
        try:
            pieces = compiled_template(source).generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=bos_token, eos_token=eos_token)
            return _joined_within(pieces, limit, whose, len(messages))
        finally:
            _watchdog.disarm(ticket)
    except _RenderTimeout:
        _watchdog.disarm(ticket)  # the interrupt may have landed inside the first disarm
        raise ChatTemplateRefusedError(
            f"{whose} did not finish within {RENDER_SECONDS:g} s; it loops without end or does far too much "
            "work: fix the template or use another model") from None
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateRefusedError(f"{whose} was refused by the sandbox: {_one_line(e)}") from None
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"{whose} does not parse: {_one_line(e)}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"{whose} failed: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - TypeError, ZeroDivisionError, RecursionError, ...: the template's
        raise ChatTemplateError(f"{whose} failed: {type(e).__name__}: {_one_line(e)}") from None


def check_template(render: Callable[[list[dict]], object]) -> None:
    """Render SAMPLE_CONVERSATIONS with `render`: ChatTemplateRefusedError as soon as one is refused
    (time, output, sandbox), the first ChatTemplateError if none renders. A template may refuse some
    conversations on purpose (no system role, strict alternation), so one success is enough."""
    failures = []
    for sample in SAMPLE_CONVERSATIONS:
        try:
            render(sample)
        except ChatTemplateRefusedError:
            raise
        except ChatTemplateError as e:
            failures.append(e)
    if len(failures) == len(SAMPLE_CONVERSATIONS):
        raise failures[0]


def output_limit(messages) -> int:
    """The most characters a render of these messages may write: generous, and growing with them."""
    return OUTPUT_FLOOR_CHARS + OUTPUT_PER_MESSAGE_CHAR * _text_size(messages)


def _text_size(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(item) for item in value)
    return 0


def _joined_within(pieces, limit: int, whose: str, count: int) -> str:
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > limit:
            raise ChatTemplateRefusedError(
                f"{whose} wrote more than {limit:,} characters for {count} message(s); it loops without "
                "end or repeats itself: fix the template or use another model")
        out.append(piece)
    return "".join(out)


def _one_line(error: BaseException, longest: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= longest else text[:longest - 1] + "…"


class _RenderTimeout(BaseException):
    """Raised into a rendering thread by the watchdog; a BaseException, so no `except Exception` on the
    way (jinja's or a filter's) swallows it. It never leaves render_template."""


class _Watchdog:
    """One daemon thread that raises _RenderTimeout into a thread whose render passed its deadline.

    arm/disarm cost a lock and a dict entry; the thread is woken only when a deadline earlier than
    the one it sleeps towards is armed (with one budget for all renders: when it was idle)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[float, int]] = {}  # ticket -> (deadline, thread ident)
        self._fired: set[int] = set()
        self._tickets = itertools.count()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        ticket, deadline = next(self._tickets), time.monotonic() + seconds
        with self._cond:
            self._armed[ticket] = (deadline, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="arbor-template-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()
        return ticket

    def disarm(self, ticket: int) -> None:
        """Stop watching ticket; if the watchdog fired meanwhile, cancel its exception if not yet raised."""
        with self._cond:
            self._armed.pop(ticket, None)
            if ticket in self._fired:
                self._fired.discard(ticket)
                _raise_in_thread(threading.get_ident(), None)

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ticket, (deadline, ident) in list(self._armed.items()):
                    if deadline <= now:  # fired under the lock: disarm cannot run in between
                        del self._armed[ticket]
                        self._fired.add(ticket)
                        _raise_in_thread(ident, _RenderTimeout)
                self._wake_at = min((deadline for deadline, _ in self._armed.values()), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _raise_in_thread(ident: int, exception: type[BaseException] | None) -> None:
    # CPython raises it in that thread at its next bytecode boundary; None cancels a pending one.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exception and ctypes.py_object(exception))


def _new_watchdog() -> None:
    global _watchdog
    _watchdog = _Watchdog()  # a forked child has no watchdog thread, and perhaps a lock held by it


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_new_watchdog)


def control_token_pattern(specials: dict[str, int]):
    """A regex matching any control token; longest first, so "<|im_end|>" wins over a prefix of it."""
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def split_on_control_tokens(text: str, pattern, specials: dict[str, int]):
    """(text before, id) for each control token in text, then (rest, None)."""
    start = 0
    for match in pattern.finditer(text) if pattern else ():
        yield text[start:match.start()], specials[match.group()]
        start = match.end()
    yield text[start:], None


def fresh_markers() -> tuple[str, str]:
    # Private-use characters plus a per-call nonce: a message cannot contain a marker by chance or on purpose.
    nonce = secrets.token_hex(8)
    return f"\ue000{nonce}\ue001", f"\ue001{nonce}\ue000"


def shielded(value, pattern, open_mark: str, close_mark: str):
    """A copy of messages with every control-token spelling in their strings wrapped in markers."""
    if pattern is None:
        return value
    if isinstance(value, str):
        return pattern.sub(lambda m: open_mark + m.group() + close_mark, value)
    if isinstance(value, dict):
        return {key: shielded(item, pattern, open_mark, close_mark) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [shielded(item, pattern, open_mark, close_mark) for item in value]
    return value
