"""A model's chat template, rendered in a sandbox, with message text shielded from it.

The template is jinja, as HF writes it, run in an immutable sandbox that fails loudly. Message
text is only ever text: before rendering, every control-token spelling inside a message is wrapped
in markers nobody can guess, so the tokenizer finds it again after rendering and spells it out in
ordinary tokens ("<|im_start|>" typed in a prompt cannot forge a chat turn). Finding control-token
spellings in text (control_token_pattern, split_on_control_tokens) lives here for the same reason.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from functools import lru_cache

from arbor_cli.errors import ConfigError


class ChatTemplateError(ConfigError):
    """A model without a chat template, or one whose template fails or is refused by the sandbox."""


def render_template(source: str | None, messages: list[dict], *, add_generation_prompt: bool,
                    bos_token: str, eos_token: str) -> str:
    """The conversation as the template `source` writes it."""
    from jinja2 import TemplateError

    if not source:
        raise ChatTemplateError("model has no chat template; use `arbor generate` for plain completion")
    try:
        return _compiled_template(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except (TemplateError, TypeError) as e:  # TypeError: e.g. a template adding None to a string
        raise ChatTemplateError(f"chat template failed: {e}") from None


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


@lru_cache(maxsize=8)
def _compiled_template(source: str):
    """The template compiled in the jinja environment HF renders chat templates in, but with a
    sandbox that fails loudly: the stock one renders a forbidden attribute as empty text."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LoudSandbox(ImmutableSandboxedEnvironment):
        # a template that reaches for `__class__` is hostile or broken: either way, no prompt from it
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"template tried to access {attribute!r} of a {type(obj).__name__} object")

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes "<" and ">", which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = LoudSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
