"""Building the compiled decode step (compiled_decode.py) for next time, in a process of its own.

The first decode on a machine without the library used to compile it in the foreground: 57-112 s on 2 cores
before the first command's answer went on. Now that command decodes eager and `start` launches

    python -m arbor_torch.background_compile CHECKPOINT DTYPE QUANTIZE ARTIFACT

detached (its own session: a Ctrl-C at the terminal does not reach it; it outlives the command) and at the lowest
CPU priority, writing everything it says to ARTIFACT's .log, never to the user's terminal. It loads the model from
its checkpoint as the command did, checks that the step it re-creates has the artifact's name (the same key: torch,
CPU, sources, config, weight shapes), and compiles it under the artifact's lock, written whole or not at all (a
.failed file on failure, which stops later processes from trying again, as a foreground failure does).

One build at a time: `start` launches nothing while another process holds the lock (that process's build is the
one waited for), and a build that finds the library, or its .failed file, already there when it gets the lock
does nothing. (Two commands started within the second or two before a job takes the lock each launch one: one
builds, the other waits on the lock and logs that it had nothing to do.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .compiled_decode import CompiledDecode, artifact_key
from .machine_cache import key_digest, notice

MODULE = "arbor_torch.background_compile"


def lock_name(path: Path) -> str:
    return f"compile-{path.stem}"


@dataclass(frozen=True)
class BuildSource:
    """What a background build loads to re-create a model's decode step: the checkpoint's directory and the load
    options that decide the model's weights (the artifact's key checks that it re-created the same ones)."""
    checkpoint: str
    dtype: str
    quantize: str

    def start(self, path: Path) -> bool:
        return start(self, path)


def start(source: BuildSource, path: Path) -> bool:
    """Launch the build of `path` from `source` unless another process is building it; say so in one line either
    way. False when no build is under way (the launch failed)."""
    from arbor_weights.store import lock_if_free

    with lock_if_free(lock_name(path)) as free:
        if not free:
            notice("another arbor process is compiling the decode step; decoding runs uncompiled until it is ready")
            return True
    log = path.with_suffix(".log")
    notice(f"compiling the decode step in the background for next time (a minute or two on 2 cores, at low "
           f"priority; decoding runs uncompiled meanwhile; log: {log}; ARBOR_COMPILE=0 skips it)")
    try:
        launch([sys.executable, "-m", MODULE, source.checkpoint, source.dtype, source.quantize, str(path)], log)
    except OSError as e:
        notice(f"could not start the background compile ({e}); decoding runs uncompiled")
        return False
    return True


_launched: list[subprocess.Popen] = []  # held, so no Popen is collected (and warned about) while its child runs


def launch(command: list[str], log: Path) -> None:
    """Run `command` detached: its own session, no stdin, stdout and stderr into `log`, this process's imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if os.name == "nt":
        detached = {"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}
    else:
        detached = {"start_new_session": True}
    with open(log, "a", encoding="utf-8") as out:  # appended: a build that finds nothing to do says so after
        _launched.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, close_fds=True, **detached))


def lower_priority() -> None:
    """The lowest CPU priority: the user's own commands come first (the compiler's processes inherit it)."""
    try:
        if os.name == "nt":
            import psutil

            psutil.Process().nice(psutil.IDLE_PRIORITY_CLASS)
        else:
            os.nice(19)
    except (OSError, ImportError):
        pass


def build(source: BuildSource, path: Path) -> bool:
    """Load the model as the command did, re-create its decode step and compile it into `path`; on any failure
    write `path`'s .failed file (except when the step is not `path`'s: the checkpoint or arbor changed since)."""
    import torch

    from arbor_core.rope import rope_frequencies
    from arbor_weights.checkpoint import open_checkpoint

    from . import load

    failed = path.with_suffix(".failed")
    try:
        lm = load(open_checkpoint(source.checkpoint), "cpu", source.dtype, 16, source.quantize)
        compiled = CompiledDecode(lm.model, source)
        key = artifact_key(compiled.step_module, compiled.weights)
        if path.name != f"decode-{key_digest(key)}.pt2":
            notice(f"{source.checkpoint} now makes another decode step than {path.name}: not built")
            return False
        lm.set_rope(rope_frequencies(lm.config), 64)
        with torch.no_grad():
            return compiled.build(path, key, compiled.inputs(lm.new_cache(64), 0))
    except Exception as e:  # noqa: BLE001 - whatever it is, remember it (the traceback stays in the log)
        import traceback

        traceback.print_exc()
        failed.write_text(f"{type(e).__name__}: {str(e).strip()[:200]}\n", encoding="utf-8")
        return False


def main(argv: list[str] | None = None) -> int:
    from arbor_weights.store import held_lock

    checkpoint, dtype, quantize, artifact = argv if argv is not None else sys.argv[1:]
    lower_priority()
    path = Path(artifact)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {path.name} from {checkpoint} ({dtype}, "
          f"{quantize})", flush=True)
    with held_lock(lock_name(path)):
        if path.exists() or path.with_suffix(".failed").exists():
            print(f"pid {os.getpid()}: built (or failed) by another process meanwhile: nothing to do", flush=True)
            return 0
        print(f"pid {os.getpid()}: building", flush=True)
        ok = build(BuildSource(checkpoint, dtype, quantize), path)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'done' if ok else 'failed'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
