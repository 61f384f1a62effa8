"""One exception family for everything a user can get wrong or a file can break.

The CLI turns any ArborError into one line on stderr and an exit code; library users
catch ArborError. Every message says what happened and what to do about it.
"""


class ArborError(Exception):
    """Base class: a problem the user can act on (not a bug in arbor)."""

    exit_code = 1


class UsageError(ArborError):
    """Bad arguments or options (CLI exit code 2)."""

    exit_code = 2


class ConfigError(ArborError):
    """A model config that arbor cannot run; the message names the field."""


class ModelNotFoundError(ArborError):
    """An unknown model name or a path that does not exist."""


class CorruptModelError(ArborError):
    """A weights, config or tokenizer file that is truncated, malformed or inconsistent."""


class ChecksumError(CorruptModelError):
    """A downloaded file whose sha256 differs from the expected one."""


class PullError(ArborError):
    """A download that could not be made (offline, missing package, hub error)."""


class BackendUnavailableError(ArborError):
    """The requested backend or device is not installed or not present."""


class ContextError(ArborError):
    """The requested context does not fit the model or the machine's memory."""


class InputError(ArborError):
    """Input text that cannot be used (missing, empty, binary file)."""


class OutOfMemoryError(ArborError):
    """The device ran out of memory; callers may retry with a smaller context."""


class ScoringUnavailableError(ArborError):
    """The door cannot score a prompt's tokens (an engine that answers no completions with echo and
    logprobs): a caller that only ranks with the scores goes on without them."""
