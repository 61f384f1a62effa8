"""The one reader of numbers a person hands arbor: environment variables (ARBOR_DOC_CACHE_MB,
ARBOR_PREFILL_CHUNK, ARBOR_MAX_INPUT_MB, …), switches (ARBOR_COMPILE=0|1, …) and command-line values
that the option parser has already made numbers (click reads `--lr nan` and `--depth inf` as floats).

Every refusal is a UsageError (exit 2) that names the variable or option and says what it takes, so
`ARBOR_PREFILL_CHUNK=abc` is one line, not a traceback, and `ARBOR_DOC_CACHE_MB=-1` is refused, not
used. Not-a-number and infinities are never numbers here.
"""

from __future__ import annotations

import math
import os

from .errors import UsageError

SWITCH_ON, SWITCH_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SWITCH_MODES = {"ARBOR_COMPILE": ("sync",)}  # words a switch also takes, each a way of being on


def _wanted(kind: type, minimum: float | None, above: float | None, maximum: float | None) -> str:
    """'a whole number of at least 1', 'a number above 0', … : what a value must be, in words."""
    bounds = []
    if minimum is not None:
        bounds.append(f"at least {minimum:g}")
    if above is not None:
        bounds.append(f"above {above:g}")
    if maximum is not None:
        bounds.append(f"at most {maximum:g}")
    said = " and ".join(bounds)
    return ("a whole number" if kind is int else "a number") + (" of " if said.startswith("at") else " ") * bool(said) + said


def check_number(value, name: str, kind: type = float, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None):
    """`value` when it is a finite number (a whole one for kind=int) within the bounds, else a UsageError
    naming `name` (the option, as the user typed it, or the variable)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (kind is not int or float(value).is_integer())
          and (minimum is None or value >= minimum) and (above is None or value > above)
          and (maximum is None or value <= maximum))
    if not ok:
        shown = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else f"{value:g}"
        raise UsageError(f"{name} must be {_wanted(kind, minimum, above, maximum)}, got {shown}")
    return kind(value)


def parse_number(text: str, name: str, kind: type = float, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None):
    """`text` read as a number of `kind` within the bounds ('1.5' is not a whole number; 'nan', 'inf' and ''
    are not numbers), else a UsageError naming `name` and quoting the text as given."""
    try:
        value = int(text.strip()) if kind is int else float(text.strip())
        return check_number(value, name, kind, minimum=minimum, above=above, maximum=maximum)
    except (ValueError, UsageError):
        raise UsageError(f"{name} must be {_wanted(kind, minimum, above, maximum)}, got {text!r}") from None


# every number arbor reads from the environment: its kind and bounds, in one place (0 for the prefill chunk: the
# backend's own choice). check_environment() reads them all as a command starts, so a bad one is refused at once,
# before a model loads, whichever command would have read it (and whenever)
NUMBERS = {
    "ARBOR_DOC_CACHE_MB": (float, {"minimum": 0}),  # megabytes of document caches kept; 0 keeps none
    "ARBOR_MAX_INPUT_MB": (int, {"minimum": 1}),  # the largest document read
    "ARBOR_PREFILL_CHUNK": (int, {"minimum": 0}),  # tokens per prefill chunk; 0: the backend's choice
    "ARBOR_PROGRESS_SECONDS": (float, {"above": 0}),  # off a terminal, a progress line about this often
}
SWITCHES = ("ARBOR_COMPILE", "ARBOR_CUDA_GRAPHS", "ARBOR_LAYOUT_CACHE", "ARBOR_DEBUG", "ARBOR_INTEGER_KERNELS")


def env_number(variable: str, default):
    """The environment variable (one of NUMBERS) as a number of its kind within its bounds, or `default` when
    it is unset or blank; any other value is a UsageError naming the variable."""
    kind, bounds = NUMBERS[variable]
    raw = os.environ.get(variable, "")
    return default if not raw.strip() else parse_number(raw, variable, kind, **bounds)


def env_switch(variable: str, default: bool) -> bool:
    """An on/off environment variable (one of SWITCHES): 1/true/yes/on or 0/false/no/off; unset or blank is
    `default`."""
    assert variable in SWITCHES, variable
    raw = os.environ.get(variable, "").strip().lower()
    if not raw:
        return default
    if raw in SWITCH_ON or raw in SWITCH_OFF:
        return raw in SWITCH_ON
    if raw in SWITCH_MODES.get(variable, ()):
        return True
    modes = "".join(f" or {word}" for word in SWITCH_MODES.get(variable, ()))
    raise UsageError(f"{variable} must be 1 or 0 (on or off){modes}, got {os.environ[variable]!r}")


def check_environment() -> None:
    """Every number and switch arbor reads from the environment, read once: the first bad one is a UsageError."""
    for variable in NUMBERS:
        env_number(variable, None)
    for variable in SWITCHES:
        env_switch(variable, False)
