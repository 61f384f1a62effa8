"""What every command shares: the global options, the stderr console, input reading (documents.py, its
warnings on stderr), output writing.

stdout carries only the answer. Everything a person watches (progress, notices, warnings) goes
to stderr through rich, which drops colour under NO_COLOR and ANSI codes when not a terminal.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from arbor_core.errors import UsageError
from arbor_core.number_input import SWITCH_ON, check_environment, env_number

from .. import documents
from ..documents import stdin_is_piped as stdin_is_piped  # the commands read it from here

DEFAULT_MAX_INPUT_MB = 128  # documents beyond this are refused unless asked for: a 128 MB text is ~30M tokens

console = Console(stderr=True, highlight=False, soft_wrap=True)  # everything a person watches; one line per message
# tables that ARE the answer (info, models) go to stdout; in a pipe, wide enough not to crop names
answer_console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name, hf:ORG/NAME, or path "
                                                 "(HF dir, Arbor dir, .gguf file).", envvar="ARBOR_MODEL")]
BackendOpt = Annotated[Optional[str], typer.Option("--backend", help="torch, mlx or auto.", envvar="ARBOR_BACKEND")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N, mps (default: best available).")]
ContextOpt = Annotated[Optional[int], typer.Option("--context", help="Context length in tokens (default: chosen "
                                                   "from the input and free memory).")]
RopeOpt = Annotated[str, typer.Option("--rope", help="RoPE scaling beyond the model's trained context: auto (YaRN, "
                                      "chosen by measurement: docs/long-context.md), none, linear, dynamic, yarn or llama3.")]
KvBitsOpt = Annotated[int, typer.Option("--kv-bits", help="KV cache precision: 16 (the model's dtype) or 8 (int8 "
                                         "with per-head scales: about twice the context per GiB).",
                                         envvar="ARBOR_KV_BITS")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="Weight-only quantization at load, CPU: "
                                                   "int8 (per channel) or int4 (groups of 32); faster decode, "
                                                   "less memory (docs/performance.md).", envvar="ARBOR_QUANTIZE")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Float weights in float32, bfloat16 or float16. "
                                                 "Default: a 4-bit model runs its own 4-bit weights on a CPU (int4, "
                                                 "compiled decode); --dtype float32 is the exact float path.",
                                                 envvar="ARBOR_DTYPE")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", metavar="URL", envvar="ARBOR_ENGINE", show_default=False,
                                                  help="Run the generations on this OpenAI-compatible server (vLLM, "
                                                  "llama.cpp's server, Ollama, arbor serve) instead of loading the "
                                                  "model here; --model names the model whose tokenizer counts tokens.")]
EngineModelOpt = Annotated[Optional[str], typer.Option("--engine-model", metavar="NAME", envvar="ARBOR_ENGINE_MODEL",
                                                       show_default=False, help="The model id to ask the engine for "
                                                       "(default: the first it lists).")]
EngineKeyOpt = Annotated[Optional[str], typer.Option("--engine-api-key", metavar="KEY", envvar="ARBOR_ENGINE_API_KEY",
                                                     show_default=False, help="The engine's API key (Bearer).")]
EngineTimeoutOpt = Annotated[float, typer.Option("--engine-timeout", metavar="SECONDS", envvar="ARBOR_ENGINE_TIMEOUT",
                                                 help="With --engine: give up on a try when connecting, the answer's "
                                                 "start, a whole answer or a streamed line takes longer than this; "
                                                 "a request's tries take at most twice this in all.")]
ParallelOpt = Annotated[int, typer.Option("--parallel", metavar="N", help="With --engine: how many requests run at "
                                          "once (the parts of a long document).")]
MaxInputOpt = Annotated[Optional[int], typer.Option("--max-input-mb", metavar="MB", show_default=False,
                                                    help="Refuse documents larger than this (default 128, or "
                                                    "ARBOR_MAX_INPUT_MB).")]


@dataclass(kw_only=True)
class GlobalOptions:
    """The options every model-loading command shares, as one value (see model_options)."""

    model: str | None = None
    backend: str | None = None
    device: str | None = None
    context: int | None = None
    rope: str = "auto"
    kv_bits: int = 16
    quantize: str | None = None
    dtype: str | None = None
    debug: bool = False
    engine: str | None = None
    engine_model: str | None = None
    engine_api_key: str | None = None
    parallel: int = 1
    engine_timeout: float = 120.0


# each shared option once: its name in GlobalOptions and on the command's signature, and its declaration
# (defaults come from GlobalOptions)
SHARED_OPTIONS = {"model": ModelOpt, "backend": BackendOpt, "device": DeviceOpt, "context": ContextOpt,
                  "rope": RopeOpt, "kv_bits": KvBitsOpt, "quantize": QuantizeOpt, "dtype": DtypeOpt,
                  "debug": DebugOpt}
ENGINE_OPTIONS = {"engine": EngineOpt, "engine_model": EngineModelOpt, "engine_api_key": EngineKeyOpt,
                  "parallel": ParallelOpt, "engine_timeout": EngineTimeoutOpt}


def model_options(fn=None, *, without: tuple[str, ...] = (), engine: bool = False):
    """Give a command the shared options (--model … --debug) and hand them to it as one keyword-only
    `opts: GlobalOptions`. `without` leaves out options the command does not take or declares itself;
    `engine` adds --engine, --engine-model, --engine-api-key and --parallel."""
    if fn is None:
        return functools.partial(model_options, without=without, engine=engine)
    offered = {**SHARED_OPTIONS, **(ENGINE_OPTIONS if engine else {})}
    shared = {name: spec for name, spec in offered.items() if name not in without}
    signature = inspect.signature(fn, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "opts"]
    defaults = {f.name: f.default for f in dataclasses.fields(GlobalOptions)}
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=defaults[name])
             for name, annotation in shared.items()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        opts = GlobalOptions(**{name: kwargs.pop(name) for name in shared if name in kwargs})
        return fn(*args, opts=opts, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    return wrapper


def load_model(opts: GlobalOptions):
    """Load the model for a command (or, with --engine, connect to the server that runs it), routing the
    model's notices (RoPE scaling, retries, …) to stderr."""
    import arbor_cli

    if opts.engine:
        from ..engine import connect

        with status("connecting to the engine…"):
            model = connect(opts.engine, opts.model, served=opts.engine_model, api_key=opts.engine_api_key,
                            parallel=opts.parallel, context=opts.context, timeout=opts.engine_timeout,
                            notify=notice)
        return model
    if opts.parallel != 1:
        raise UsageError("--parallel needs --engine: a model loaded here answers one request at a time")
    with status("loading model…"):
        model = arbor_cli.load(opts.model, backend=opts.backend, device=opts.device, context=opts.context,
                               rope=opts.rope, kv_bits=opts.kv_bits, quantize=opts.quantize,
                               dtype=opts.dtype)
    model.notify = notice
    return model


def notice(message: str) -> None:
    console.print(f"[dim]arbor:[/dim] {escape(message)}", markup=True, highlight=False)


def warn(message: str) -> None:
    console.print(f"[yellow]arbor: warning:[/yellow] {escape(message)}", markup=True, highlight=False)


PLAIN_PROGRESS_SECONDS = 10.0  # off a terminal, a progress line about this often while a command works


def plain_progress_seconds() -> float:
    """PLAIN_PROGRESS_SECONDS, or ARBOR_PROGRESS_SECONDS where set (a number above 0)."""
    return env_number("ARBOR_PROGRESS_SECONDS", PLAIN_PROGRESS_SECONDS)


def status(message: str):
    """A spinner on stderr while something slow runs on a terminal; off one, a line every
    plain_progress_seconds() while it runs (a pipe or a log never goes quiet for minutes)."""
    return console.status(message, spinner="dots") if console.is_terminal else Heartbeat(message)


class Heartbeat:
    """Off a terminal: `message` with the time elapsed on stderr every `every` seconds until the block ends."""

    def __init__(self, message: str, every: float | None = None):
        self.message, self.every = message.rstrip("…. "), plain_progress_seconds() if every is None else every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="arbor-heartbeat")

    def __enter__(self) -> "Heartbeat":
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join()
        return False

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            notice(f"{self.message} · {time.monotonic() - self.started:.0f}s elapsed")


def max_input_bytes(megabytes: int | None = None) -> int:
    """The largest document arbor reads: `megabytes` (--max-input-mb), else ARBOR_MAX_INPUT_MB, else
    DEFAULT_MAX_INPUT_MB."""
    if megabytes is not None:
        if megabytes < 1:
            raise UsageError(f"--max-input-mb must be at least 1, got {megabytes}")
        return megabytes << 20
    return env_number("ARBOR_MAX_INPUT_MB", DEFAULT_MAX_INPUT_MB) << 20


def read_document(source: str | None, max_bytes: int | None = None, progress=None) -> documents.Document:
    """A FILE, or stdin for '-' (or no FILE with piped stdin): documents.read_document, at most `max_bytes`
    (default: max_input_bytes()), its warnings on stderr, a long PDF's pages on `progress`."""
    return documents.read_document(source, max_input_bytes() if max_bytes is None else max_bytes, warn, progress)


def read_text_input(source: str | None, max_bytes: int | None = None) -> tuple[str, str]:
    """(text, name) of read_document."""
    document = read_document(source, max_bytes)
    return document.text, document.name


def read_documents(sources: list[str], max_bytes: int | None = None, progress=None
                   ) -> tuple[list[documents.Document], list[tuple[str, str]]]:
    """(documents, [(name, why skipped)]) of FILEs, DIRs and '-': documents.read_documents, at most
    `max_bytes` each (default: max_input_bytes()), each skipped file said on stderr, a long PDF's pages on
    `progress` (the command's progress_display)."""
    return documents.read_documents(sources, max_input_bytes() if max_bytes is None else max_bytes, warn, progress)


def read_schema(value: str | None) -> str | None:
    """--schema FILE|JSON: JSON text as it is, "json_object" for any JSON object, else a file's text."""
    if value is None or value == "json_object" or value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--schema {value}: cannot read the schema file ({e.strerror or e})") from None


SCHEMA_HELP = ("Hold the answer to a JSON schema, token by token: a file, JSON text, or 'json_object' "
               "for any JSON object.")


def write_answer(text: str, end: str = "\n") -> None:
    """Write to stdout and flush, so an unwritable stdout fails here with an OSError the CLI reports."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


def no_color() -> bool:
    return "NO_COLOR" in os.environ


def handle_errors(fn):
    """Turn failures into one line on stderr and an exit code; tracebacks only with --debug.

    0 ok, 1 runtime error, 2 usage error, 130 interrupted.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool(kwargs.get("debug")) or os.environ.get("ARBOR_DEBUG", "").strip().lower() in SWITCH_ON
        try:
            check_environment()  # ARBOR_* numbers and switches: a bad one is exit 2 before any work
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            console.print("arbor: interrupted", highlight=False)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(1) from None
        except Exception as e:
            if debug:
                console.print_exception()
            console.print(f"arbor: error: {describe_error(e)}", highlight=False, markup=False)
            raise typer.Exit(exit_code_for(e)) from None

    return wrapper


def describe_error(e: BaseException) -> str:
    from arbor_core.errors import ArborError

    if isinstance(e, ArborError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"cannot write or read{where}: {e.strerror}"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"internal error: {type(e).__name__}: {first} (run with --debug for the traceback)"


def exit_code_for(e: BaseException) -> int:
    from arbor_core.errors import ArborError

    return e.exit_code if isinstance(e, ArborError) else 1


def silence_stdout() -> None:
    # the reader went away (`| head`): point stdout at /dev/null so the interpreter's final flush is quiet
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
