"""The jinja environment a chat template is compiled in: HF's, with a sandbox that fails loudly and
refuses to build huge values.

HF renders chat templates in an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, the
loopcontrols extension, `raise_exception`, `strftime_now` and a tojson that leaves "<" and ">" alone;
arbor uses the same, so a prompt reads as the model's makers wrote it. Two things differ:
- the stock sandbox renders a forbidden attribute (`__class__`) as empty text; this one raises, since a
  template that reaches for one is hostile or broken, and no prompt should come from it;
- an operation that builds a huge value in one C call (`'x' * 10**9`, `9 ** 9 ** 9`, a width of
  millions in a format, a filter or a namespace) is refused before it runs: the watchdog of
  chat_template.py interrupts only between bytecodes, and such a call is one.
Imported on the first render, so that importing arbor does not import jinja.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

LARGEST_COUNT = 10_000_000  # a repeat count, width or padding above this is refused
LARGEST_POWER_BITS = 100_000  # an integer power with more bits than this is refused
# a width of 10 million or more in a printf-style or str.format format string
_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{8,}|\{[^{}]*:[^{}]*\d{8,}")


@functools.lru_cache(maxsize=8)
def compiled_template(source: str):
    """The template compiled in the jinja environment HF renders chat templates in, but with a
    sandbox that fails loudly and refuses operations that build a huge value in one step.
    Syntax errors propagate."""
    env = LoudSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "format", "wordwrap"):
        env.filters[name] = _bounded(env.filters[name], f"a {name} width")
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = BoundedNamespace
    return env.from_string(source)


def _refuse_huge(what: str, *values) -> None:
    for value in values:
        if isinstance(value, tuple):  # the arguments of `%`
            _refuse_huge(what, *value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_COUNT:
            raise SecurityError(f"template asked for {what} of {value:,} (more than {LARGEST_COUNT:,})")


def _refuse_wide_format(fmt) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise SecurityError("template asked for a format width of 10 million or more")


class LoudSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    # a template that reaches for `__class__` is hostile or broken: either way, no prompt from it
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"template tried to access {attribute!r} of a {type(obj).__name__} object")

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and left.bit_length() * right > LARGEST_POWER_BITS:
            raise SecurityError(f"template asked for a power with more than {LARGEST_POWER_BITS:,} bits")
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int) \
                    and len(sized) * count > LARGEST_COUNT:
                raise SecurityError(f"template asked for a repetition of more than {LARGEST_COUNT:,} items")
        if operator == "%" and isinstance(left, str):
            _refuse_wide_format(left)
            _refuse_huge("a format width", right)
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj, attribute):
        if attribute in ("format", "format_map") and isinstance(obj, str):
            _refuse_wide_format(obj)
        return super().getattr(obj, attribute)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _refuse_huge("a width or count", *args, *kwargs.values())
        return super().call(__context, __obj, *args, **kwargs)


class BoundedNamespace(Namespace):
    # the one mutable value a template has: growing it in a loop must stay bounded too
    def __setitem__(self, key, value):
        if isinstance(value, (str, list, tuple)) and len(value) > LARGEST_COUNT:
            raise SecurityError(f"template stored a value of more than {LARGEST_COUNT:,} items")
        super().__setitem__(key, value)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes "<" and ">", which would change the prompt.
    _refuse_huge("an indent", indent)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _bounded(filter_function, what: str):
    @functools.wraps(filter_function)  # keeps jinja's pass_environment mark (wordwrap has one)
    def checked(*args, **kwargs):
        _refuse_huge(what, *args[1:], *kwargs.values())
        _refuse_wide_format(args[0] if what == "a format width" and args else None)
        return filter_function(*args, **kwargs)
    return checked
