"""The CPU decode step compiled ahead of time, once per machine, and kept in arbor's cache.

A quantized decode step on a laptop CPU spends more time dispatching ~40 small ops a layer from
Python than in its matmul kernels (docs/performance.md, "CPU decode"). torch.export traces
decode_step.DecodeStep once with the cache length symbolic, AOTInductor compiles the graph into one
shared library, and every later process loads that library in milliseconds (its C++ loader alone:
load_library) and calls it once a token.

The artifact holds code only: the weights are inputs (the model's own tensors, shared, never
copied), so it is a few MB whatever the model's size, and one artifact serves every model of the
same architecture and weight format. Its name is a hash of everything the generated code depends
on: torch's version, this CPU's instruction set, the source of the modules traced, the model's
config and the shapes and dtypes of its weights. Anything else is a different file, so a stale
artifact is never loaded; it ages out (the least recently used beyond KEEP are deleted).

No command waits for the compile (~1-2 minutes on 2 cores): where no library exists yet, the step runs eager
and a detached, low-priority process (background_compile.py, started through `source`) builds it for next time
from the model's checkpoint, under the artifact's lock, so two commands never build it twice; a process that
keeps decoding looks for the file now and then and switches to it once it is there. A library is loaded through
its C++ loader alone, without importing torch._inductor (2-4.5 s of every process on 2 cores, more than a short
reply's whole decode), and only from a process's EAGER_FIRST+1th decode step: a short reply never pays even for
the check. ARBOR_COMPILE=sync builds it in the process and uses it from the first step, as before (the tests
that compile use it); a model with no checkpoint to rebuild it from (one made in memory) is compiled only then.

Nothing here may cost a user a crash: no compiler, a failing compile, a damaged file, or a library
whose output disagrees with the eager step each falls back to the eager path with one line on
stderr. Only a library can fail the check, never its inputs: where the eager step's own output is not
finite (a cache holding NaN or infinity, say from a damaged document cache), the check says nothing
about the library, so that step runs eager and the check waits for the next. A failed compile is remembered (a .failed file beside where the artifact would be) so later
runs do not pay for it again; ARBOR_COMPILE=0 turns the whole thing off, and ARBOR_COMPILE_DIR
moves the artifacts elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from arbor_core.number_input import env_switch

from . import decode_step, integer_kernels, model, quantize
from .arch import FAMILIES, pieces
from .decode_step import DecodeStep
from .machine_cache import key_digest, machine_key, mark_used, notice, prune, sources_digest

ENV = "ARBOR_COMPILE"
DIR_ENV = "ARBOR_COMPILE_DIR"
KEEP = 8  # artifacts kept in the cache directory, least recently used deleted first
# Inductor takes a symbolic size to be >= 2 (1 would broadcast): a step after a 1-token past runs eager
MIN_PAST = 2
# The first compiled step is checked against the eager one on the same inputs, so a wrong library is never
# used. Not for equality: the bf16 casts before each quantized matmul turn float32 summation-order noise
# into whole bf16 steps now and then (~1% of the logits' norm); a wrong library is off by ~100%.
CHECK_REL = 0.05


# The first steps of a process run eager: a reply that ends within them (a one-sentence chat answer: the README's
# is 8 tokens) neither loads nor checks the library (~2 eager steps' cost, repaid after ~2 tokens on a quiet CPU)
# and runs exactly as with ARBOR_COMPILE=0, never at the mercy of the library's speed on a crowded CPU; a long
# one gives up at most 16 steps' difference (~0.13 s on 2 cores). docs/performance.md, "The compiled decode step
# pays for itself". ARBOR_COMPILE=sync uses it from the first step.
EAGER_FIRST = 16
LOOK_AGAIN_S = 2.0  # while a library is being built elsewhere: how often a decoding process looks for it


def mode() -> str:
    """"off" (ARBOR_COMPILE=0), "sync" (ARBOR_COMPILE=sync: a missing library is built in this process) or
    "background" (the default: built by a detached process for next time, never waited for). Read by the one
    parser of switches (number_input): any other value is a usage error naming ARBOR_COMPILE."""
    if os.environ.get(ENV, "").strip().lower() == "sync":
        return "sync"
    return "background" if env_switch(ENV, True) else "off"


def enabled() -> bool:
    return mode() != "off"


def _sources() -> str:
    """The code the artifact was generated from: a change to it is a different artifact."""
    return sources_digest((decode_step, model, quantize, integer_kernels, pieces,
                           *sorted(set(FAMILIES.values()), key=lambda m: m.__name__)))


def artifact_key(step: DecodeStep, weights: dict[str, torch.Tensor]) -> dict:
    """What the generated code depends on (the file's name is its hash)."""
    cfg = step.model.config
    return {
        **machine_key(),
        "sources": _sources(),
        "config": json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg), sort_keys=True, default=str),
        "weights": [[name, list(t.shape), str(t.dtype)] for name, t in weights.items()],
        "activations": str(step.model.model.norm.weight.dtype),
    }


def cache_directory() -> Path:
    """$ARBOR_COMPILE_DIR, or `compiled/` in arbor's cache (the models' home: $ARBOR_HOME or the platform's)."""
    from arbor_weights.store import cache_dir

    path = Path(os.environ.get(DIR_ENV) or cache_dir() / "compiled").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Functional(torch.nn.Module):
    """DecodeStep with its weights as the first inputs, so the compiled library embeds none of them."""

    def __init__(self, step: DecodeStep, names: list[str]):
        super().__init__()
        self.step, self.names = step, names

    def forward(self, weights, token, cache_k, cache_v, cos, sin, past):
        return torch.func.functional_call(self.step, dict(zip(self.names, weights)),
                                          (token, cache_k, cache_v, cos, sin, past), strict=True)


def compile_step(step: DecodeStep, weights: dict[str, torch.Tensor], example: tuple, out: Path) -> None:
    """Export and AOT-compile `step` into the package `out` (written whole or not at all)."""
    # DYNAMIC, not named Dims: export then keeps the relations the code implies (past < slots, past <
    # positions) as checks in the library instead of refusing them
    slots = positions = past = torch.export.Dim.DYNAMIC
    names = list(weights)
    dynamic = {"weights": (None,) * len(names), "token": None, "cache_k": {2: slots}, "cache_v": {2: slots},
               "cos": {0: positions}, "sin": {0: positions}, "past": {0: past}}
    with torch.no_grad():
        program = torch.export.export(_Functional(step, names), (tuple(weights.values()), *example),
                                      dynamic_shapes=dynamic, strict=False)
    partial = out.with_name(f".{out.stem}.{os.getpid()}.partial.pt2")  # AOTInductor wants the suffix
    try:
        with _quiet_warnings():
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def load_library(path: Path):
    """The package's C++ loader, made directly: `torch._inductor.aoti_load_package` makes the same loader but
    first imports torch._inductor, which cost every new process 2-4.5 s on 2 cores (measured: the loader itself
    takes 0.01 s), more than the compiled step saves over a short reply. Older torch builds whose loader takes
    other arguments go through aoti_load_package."""
    try:
        loader_class = torch._C._aoti.AOTIModelPackageLoader
    except AttributeError:
        loader_class = None
    if loader_class is not None:
        try:  # (file, model name, run single-threaded, runners, device index) as aoti_load_package passes them
            return loader_class(str(path), "model", False, 1, -1)
        except TypeError:
            pass
    with _quiet_warnings():
        return torch._inductor.aoti_load_package(str(path)).loader


@contextlib.contextmanager
def _quiet_warnings():
    """torch's own warnings and log lines about packages (e.g. "Loading outdated pt2 file" for a damaged
    one): the user gets arbor's one line instead."""
    import logging
    import warnings

    log = logging.getLogger("torch._inductor")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


class CompiledDecode:
    """The compiled step for one loaded model; `step(token, cache)` -> logits, or None to run eager.

    Looked for on the first decode (a one-token `generate` never pays for it); while it is being built elsewhere
    the step runs eager and looks again every LOOK_AGAIN_S. After any failure it stays off for the life of the
    model, having said why once. `source` (set by TorchModel.from_checkpoint: a background_compile.BuildSource)
    starts the background build.
    """

    def __init__(self, model: torch.nn.Module, source=None):
        self.source = source
        self.key = self.path = None  # the artifact's key and file, once computed
        self.look_again = 0.0  # monotonic time before which a library being built elsewhere is not looked for
        self.building = False  # this process started a background build
        self.steps = 0  # decode steps asked of it
        self.step_module = DecodeStep(model).eval()
        named = dict(self.step_module.named_parameters())
        named.update(dict(self.step_module.named_buffers()))
        self.weights = named
        self.weight_list = list(named.values())
        self.run = None  # the loaded library's entry point, once it passed its check
        self.unchecked = None  # (entry point, file) loaded, waiting for inputs the check can judge by
        self.off = False
        self.positions = torch.zeros(0, dtype=torch.long)  # `past` input: only its length is read

    def step(self, token: int, cache) -> torch.Tensor | None:
        length = cache.length
        self.steps += 1
        if self.off or length < MIN_PAST:
            return None
        if self.run is None and self.unchecked is None:
            if self.steps <= EAGER_FIRST and mode() != "sync":
                if self.path is None:  # a missing library starts being built now, for when it pays
                    self._build_if_missing()
                return None
            if time.monotonic() < self.look_again:
                return None  # the library is being built elsewhere: eager until the next look
        inputs = self.inputs(cache, token)
        if self.run is None:
            if self.unchecked is None:
                prepared = self._prepare(inputs)
                if prepared is WAIT:
                    self.look_again = time.monotonic() + LOOK_AGAIN_S
                    return None
                if prepared is None:
                    self.off = True
                    return None
                self.unchecked = prepared
            verdict, outputs = self._agrees(*self.unchecked, inputs)
            if verdict is None:  # inputs the eager step itself cannot judge by: eager now, check at the next step
                return None
            run, self.unchecked = self.unchecked[0], None
            if not verdict:
                self.off = True
                return None
            self.run = run
        else:
            outputs = self.run(self.weight_list + inputs)
        logits, k, v = outputs
        cache.stacked_k[:, :, length] = k
        cache.stacked_v[:, :, length] = v
        return logits

    def _prepare(self, inputs: list):
        """Load the library: (its entry point, its file); WAIT while it is being built elsewhere (eager meanwhile);
        None to run eager for good. Built here only under ARBOR_COMPILE=sync."""
        if not self._name():
            return None
        path, failed = self.path, self.path.with_suffix(".failed")
        if failed.exists():
            if self.building:
                notice(f"compiling the decode step in the background failed ({_failure(failed)}; log: "
                       f"{path.with_suffix('.log')}); decoding stays uncompiled")
            else:
                notice(f"decoding uncompiled: compiling failed before ({_failure(failed)}; delete {failed} to try again)")
            return None
        run = self._load(path)
        if run is None:
            if mode() != "sync":
                return self._build_elsewhere(path)
            from arbor_weights.store import held_lock

            with held_lock(f"compile-{path.stem}"):  # two processes: one compiles, the other then loads
                run = self._load(path) if path.exists() else None
                if run is None:
                    run = self._build(path, self.key, failed, inputs)
        if run is None:
            return None
        prune(path.parent, "*.pt2", path, KEEP, companions=COMPANIONS)
        return run, path

    def _name(self) -> bool:
        """Find the library's key and file (False, having said why, where the step has none)."""
        if self.path is None:
            try:
                self.key = artifact_key(self.step_module, self.weights)
            except Exception as e:  # noqa: BLE001 - an odd config or module: just run eager
                notice(f"decoding uncompiled ({type(e).__name__}: {_first_line(e)})")
                self.off = True
                return False
            self.path = cache_directory() / f"decode-{key_digest(self.key)}.pt2"
        return True

    def _build_if_missing(self) -> None:
        """In the first eager steps: start the background build of a library that is neither there nor failed."""
        if self._name() and not self.path.exists() and not self.path.with_suffix(".failed").exists():
            self._build_elsewhere(self.path)

    def _build_elsewhere(self, path: Path):
        """WAIT for the library a background process builds (started here unless one holds its lock), or None
        (no checkpoint to build it from, or the build could not start: this model decodes eager)."""
        if self.source is None:
            return None
        if not self.building:
            self.building = True  # one try per model: a build that fails leaves its .failed file
            if not self.source.start(path):
                self.off = True
                return None
        return WAIT

    def _load(self, path: Path):
        if not path.exists():
            return None
        try:
            loader = load_library(path)
            mark_used(path)
            return loader.boxed_run
        except Exception as e:  # noqa: BLE001 - a truncated zip, a foreign file, a library that will not load
            notice(f"the compiled decode step {path.name} is damaged ({_first_line(e)}); rebuilding it")
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def _build(self, path: Path, key: dict, failed: Path, inputs: list):
        notice("compiling the decode step for this CPU, once per model format and torch version "
               "(about a minute on 2 cores; it makes decoding ~2x faster; ARBOR_COMPILE=0 skips it)")
        return self._load(path) if self.build(path, key, inputs) else None

    def build(self, path: Path, key: dict, inputs: list) -> bool:
        """Compile the library into `path` with its key beside it, saying how long it took; on failure leave the
        .failed file that stops later processes from trying again."""
        start = time.perf_counter()
        failed = path.with_suffix(".failed")
        try:
            compile_step(self.step_module, self.weights, _example(inputs), path)
        except Exception as e:  # noqa: BLE001 - no compiler, an inductor bug: remember it, run eager
            failed.write_text(f"{type(e).__name__}: {_first_line(e)}\n", encoding="utf-8")
            notice(f"could not compile the decode step ({type(e).__name__}: {_first_line(e)}); decoding runs "
                   f"uncompiled, about half as fast (details kept in {failed})")
            return False
        path.with_suffix(".json").write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
        notice(f"compiled in {time.perf_counter() - start:.0f} s (kept in {path.parent})")
        return True

    def inputs(self, cache, token: int) -> list:
        """The step's inputs for `token` after `cache` (its first `cache.length` positions are the past)."""
        length = cache.length
        if self.positions.shape[0] < length:
            self.positions = torch.zeros(max(length, 2 * self.positions.shape[0], 1024), dtype=torch.long)
        m = self.step_module.model
        return [torch.tensor([token], dtype=torch.long), cache.stacked_k, cache.stacked_v, m.rope_cos, m.rope_sin,
                self.positions[:length]]

    def _agrees(self, run, path: Path, inputs: list) -> tuple[bool | None, list | None]:
        """The library's first step against the eager DecodeStep on the same inputs (neither writes the cache):
        (whether it agrees, its outputs, which are this step's); None when the eager step's output is not finite:
        such inputs judge nothing, and the file is kept."""
        got = None
        try:
            with torch.no_grad():
                want = self.step_module(*inputs)
            if not all(bool(torch.isfinite(w).all()) for w in want):
                return None, None
            got = run(self.weight_list + inputs)
            ok = len(got) == len(want) and all(
                g.shape == w.shape and bool(torch.linalg.norm(g - w) <= CHECK_REL * torch.linalg.norm(w))
                for g, w in zip(got, want))
        except Exception as e:  # noqa: BLE001
            ok, why = False, _first_line(e)
        else:
            why = "its output differs from the eager step's"
        if not ok:
            notice(f"the compiled decode step {path.name} failed its check ({why}); decoding runs uncompiled "
                   "and the file is deleted")
            with contextlib.suppress(OSError):
                path.unlink()
        return ok, got


def _example(inputs: list) -> tuple:
    """Inputs to trace with: the real ones' dtypes and fixed sizes, generic symbolic sizes. The first real
    call may have a 1-token past, or a cache exactly as long as the table, which export would specialise
    the library to (sizes 0 and 1 are constants to it) or refuse as a conflict with the dynamic ranges."""
    token, cache_k, cache_v, cos, sin, past = inputs
    layers, kv, _, dim = cache_k.shape
    return (token, cache_k.new_zeros(layers, kv, 24, dim), cache_v.new_zeros(layers, kv, 24, dim),
            cos.new_zeros(40, cos.shape[1]), sin.new_zeros(40, sin.shape[1]), past.new_zeros(7))


WAIT = object()  # _prepare: the library is being built elsewhere
COMPANIONS = (".json", ".log")  # files beside an artifact, pruned with it


def _failure(failed: Path) -> str:
    return failed.read_text(errors="replace").strip()[:160]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
