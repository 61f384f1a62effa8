"""The door: what every feature (summarize, ask, chat, serve, evals) may ask of a model.

Three classes implement it: `arbor_cli.model.Model` (a model loaded here), `arbor_cli.engine.RemoteModel`
(an OpenAI-compatible server) and the tests' `FakeModel`; tests/test_door_contract.py runs one set of
checks over all three. A caller holds a `Door` and never asks which kind it has: what differs between
them (where the KV cache lives, how many requests run at once, who decides the RoPE) is decided behind it.

Prompts are token ids or chat messages ([{"role", "content"}]); `options` are arbor_cli's
GenerationOptions; a session is arbor_cli.session.Session (typed `Any` here: the ground floor
imports nothing of the app's).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

from .planner import ContextPlan


@runtime_checkable
class Door(Protocol):
    tokenizer: Any  # arbor_core.tokenizer.Tokenizer: token counts must be right for parts to fit
    config: Any  # arbor_core.config.ArborConfig (trained_context, rope_scaling, vocab_size, ...)
    checkpoint: Any  # what was loaded: .name, .path
    context: int | None  # the user's --context, the default of every call; None: planned per call
    rope_method: str  # the user's --rope, the default of every call
    notify: Callable[[str], None]  # one-line notices for the user (the CLI routes them to stderr)

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, needed_tokens: int, requested: int | None = None, rope: str | None = None) -> ContextPlan:
        """The context for `needed_tokens`; `requested` (default: `context`) is honoured exactly or refused."""

    def smaller_context(self, error: Exception, context: int, *, needed: int = 0, pinned: bool = False) -> int:
        """After an out-of-memory `error` at `context`, the context to retry at once; re-raises `error`
        when there is none (see planner.smaller_after_out_of_memory)."""

    def rope_scaling_for(self, context: int, rope: str | None = None) -> dict | None:
        """The rope_scaling a run at `context` uses (None: plain RoPE, or decided by a server)."""

    def session_context(self) -> int:
        """The context of a long-lived session (a chat) when the user names none."""

    def kv_bytes_per_token(self) -> int | None:
        """Bytes one position of this door's KV cache takes here; None where the cache is not here (an engine)."""

    # ---- generations ---------------------------------------------------------------------------
    def stream(self, prompt: list[int] | list[dict], options: Any, *, session: Any = None, continuing: bool = False,
               context: int | None = None, rope: str | None = None) -> Any:
        """The one generation entry point: a GenerationStream of text pieces. With `session`, the prompt is
        the whole conversation and what the session holds of it is reused by its rule (Session); with
        `continuing`, the prompt goes on from everything the session holds (one request read in steps).
        `options.schema` (a JSON schema's text) holds the answer to it: a model here masks every step's
        tokens, an engine is sent it as OpenAI's `response_format`; never silently dropped."""

    def stream_many(self, prompts: list, options: Any, *, context: int | None = None, rope: str | None = None,
                    parallel: int | None = None) -> Iterator[Any]:
        """Several prompts' generations at once: events (index, text, result) as each prompt's text comes, the
        last of each index carrying its GenerationResult; `options` one for all or one per prompt. A model here
        decodes them together in one batched step per token (continuous batching: `parallel` at once, the rest
        joining as others end); an engine sends them as `--parallel` requests. Greedy answers are each prompt's
        own `stream` answer (up to the backend's rounding for several rows: arbor_cli/batch.py)."""

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, *args: Any, context: int | None = None,
                 rope: str | None = None, **options: Any) -> Any:
        """Complete `prompt` (text, or token ids used as they are): a GenerationResult (or a stream)."""

    def chat(self, messages: list[dict], stream: bool = False, *, context: int | None = None,
             rope: str | None = None, session: Any = None, continuing: bool = False, **options: Any) -> Any:
        """Reply to `messages` through the model's chat template: a GenerationResult (or a stream)."""

    def score_prompt(self, ids: list[int], session: Any = None) -> list[float]:
        """log p (nats) of each of ids[1:] given the ones before it; with `session`, `ids` follow what it
        holds (and are added to it). ScoringUnavailableError where the door cannot score (an engine without
        completions' echo + logprobs)."""

    def prefill(self, ids: list[int], session: Any) -> None:
        """`session` takes `ids` after what it holds, answering nothing (a document kept for questions)."""

    # ---- sessions and work ---------------------------------------------------------------------
    def session(self, context: int | None = None, rope: str | None = None) -> Any:
        """A new, empty Session of `context` tokens (default: session_context())."""

    def map(self, work: Callable[[Any], Any], items: Iterable[Any],
            on_done: Callable[[], None] | None = None) -> Iterator[Any]:
        """work(item) for every item, results in the items' order, as many at once as the door runs."""
