"""What every command shares: the global options, the stderr console, input reading, output writing.

stdout carries only the answer. Everything a person watches (progress, notices, warnings) goes
to stderr through rich, which drops colour under NO_COLOR and ANSI codes when not a terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from arbor_core.errors import InputError, UsageError

BINARY_SNIFF_BYTES = 8192
DEFAULT_MAX_INPUT_MB = 128  # documents beyond this are refused unless asked for: a 128 MB text is ~30M tokens
READ_BLOCK_BYTES = 1 << 20

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


# each shared option once: its name in GlobalOptions and on the command's signature, and its declaration
# (defaults come from GlobalOptions)
SHARED_OPTIONS = {"model": ModelOpt, "backend": BackendOpt, "device": DeviceOpt, "context": ContextOpt,
                  "rope": RopeOpt, "kv_bits": KvBitsOpt, "quantize": QuantizeOpt, "dtype": DtypeOpt,
                  "debug": DebugOpt}
ENGINE_OPTIONS = {"engine": EngineOpt, "engine_model": EngineModelOpt, "engine_api_key": EngineKeyOpt,
                  "parallel": ParallelOpt}


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
                            parallel=opts.parallel, context=opts.context)
        model.notify = notice
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


def status(message: str):
    """A spinner on stderr while something slow runs, on a terminal only."""
    return console.status(message, spinner="dots") if console.is_terminal else contextlib.nullcontext()


def stdin_is_piped() -> bool:
    return not sys.stdin.isatty()


def max_input_bytes(megabytes: int | None = None) -> int:
    """The largest document arbor reads: `megabytes` (--max-input-mb), else ARBOR_MAX_INPUT_MB, else
    DEFAULT_MAX_INPUT_MB."""
    if megabytes is not None:
        if megabytes < 1:
            raise UsageError(f"--max-input-mb must be at least 1, got {megabytes}")
        return megabytes << 20
    raw = os.environ.get("ARBOR_MAX_INPUT_MB", "").strip()
    if not raw:
        return DEFAULT_MAX_INPUT_MB << 20
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"ARBOR_MAX_INPUT_MB must be a whole number of megabytes, at least 1; got {raw!r}")
    return int(raw) << 20


def read_text_input(source: str | None, max_bytes: int | None = None) -> tuple[str, str]:
    """(text, name) from a FILE, or stdin for '-' (or no FILE with piped stdin).

    Rejects what cannot be a document with one clear line: missing file, a directory, a device
    (/dev/zero never ends), an input larger than `max_bytes` (default: max_input_bytes(); read in
    blocks, so an endless pipe stops at the limit), an empty input, a binary file. Invalid UTF-8 is
    decoded with replacement characters and warned about once.
    """
    limit = max_input_bytes() if max_bytes is None else max_bytes
    if source in (None, "-"):
        if source is None and not stdin_is_piped():
            raise InputError("no input: give a FILE, '-' for stdin, or pipe text in")
        name = "<stdin>"
        data = _read_at_most(sys.stdin.buffer, limit, name)
    else:
        name = source
        try:
            with _open_document(Path(source)) as f:
                data = _read_at_most(f, limit, name)
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except PermissionError:
            raise InputError(f"{source}: permission denied") from None
        except IsADirectoryError:
            raise InputError(f"{source} is a directory, not a text file") from None
        except OSError as e:
            raise InputError(f"{source}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise InputError(f"{name} is empty")
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise InputError(f"{name} looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"{name} is not valid UTF-8 (first bad byte at offset {e.start}); undecodable bytes were replaced")
        text = data.decode("utf-8", errors="replace")
    return text.lstrip("\ufeff"), name


def read_documents(sources: list[str], max_bytes: int | None = None
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(name, text)], [(name, why skipped)]) of FILEs, DIRs (their text files, recursively, in sorted order;
    hidden entries and links to directories are not followed) and '-'.

    One FILE (or stdin) reads as read_text_input does: anything wrong with it is an InputError. Among
    several, or inside a directory, a file that cannot be a document (binary, empty, too large, unreadable)
    is skipped with one line on stderr; an InputError only when nothing at all could be read."""
    if len(sources) <= 1 and not (sources and Path(sources[0]).is_dir()):
        text, name = read_text_input(sources[0] if sources else None, max_bytes)
        return [(name, text)], []
    documents, skipped = [], []
    for source in sources:
        if source != "-" and not Path(source).exists() and not Path(source).is_symlink():
            raise InputError(f"{source}: no such file or directory (a pattern that matched nothing?)")
        for path in ([source] if source == "-" or not Path(source).is_dir() else _text_files_under(Path(source),
                                                                                                     skipped)):
            try:
                text, name = read_text_input(str(path), max_bytes)
            except InputError as e:
                skipped.append((str(path), str(e)))
                warn(f"skipped: {e}")
                continue
            if path != source:  # found under a directory: named by its path below it
                name = _name_under(Path(source), Path(path), several=len(sources) > 1)
            documents.append((name, text))
    if not documents:
        what = f" ({len(skipped)} skipped)" if skipped else " (no files in it)"
        raise InputError(f"no document could be read from {', '.join(sources)}{what}")
    return documents, skipped


def _name_under(folder: Path, path: Path, several: bool) -> str:
    """A file found under `folder` as the model and --json see it: its path below the folder (`notes/chess.txt`),
    with the folder's own name in front when several sources were given (two folders may both hold a
    README.md); never the absolute path the folder was given by, which would put the user's directory layout
    in every prompt and read the same folder differently from another place."""
    below = path.relative_to(folder)
    if not several:
        return str(below)
    top = folder.resolve().name if folder.name in ("", ".", "..") else folder.name
    return str(Path(top) / below)


def _text_files_under(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """Every file below `folder` in a stable (sorted) order, hidden names left out; links to directories are
    not followed (a link back up the tree would loop) and are named once as skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                dirs.remove(d)
                skipped.append((str(Path(root) / d), f"{Path(root) / d} is a link to a directory, not followed"))
                warn(f"skipped: {Path(root) / d} is a link to a directory, not followed")
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)  # as `find | sort` lists them


def _open_document(path: Path):
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise InputError(f"{path} is a device, not a text file (for a pipe or stdin use '-')")
    return path.open("rb")


def _read_at_most(stream, limit: int, name: str) -> bytes:
    """The whole stream, or an InputError as soon as it passes `limit` bytes."""
    blocks, size = [], 0
    while True:
        block = stream.read(min(READ_BLOCK_BYTES, limit + 1 - size))
        if not block:
            return b"".join(blocks)
        blocks.append(block)
        size += len(block)
        if size > limit:
            raise InputError(f"{name} is larger than the {limit >> 20:,} MB input limit; raise it with "
                             "--max-input-mb or ARBOR_MAX_INPUT_MB")


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
        debug = bool(kwargs.get("debug")) or os.environ.get("ARBOR_DEBUG") == "1"
        try:
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
