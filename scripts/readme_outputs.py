"""README.md's example outputs, regenerated from the real commands so they cannot drift (issue 32).

A console block the script owns is preceded by an HTML comment, which renders as nothing:

    <!-- readme-run: quick -->
    ```console
    $ arbor summarize docs/examples/eddystone.txt --words 60
    (what the command printed)
    ```

Each `$ ` line is a command; the lines up to the next one are its output (blank lines after it are kept
as they are). The marker's words:
  quick    runs in seconds to a minute on the default model: `--quick` runs these, and so does the test
  slow     takes minutes: `--quick` skips it
  parse    never run (it needs a server, a GPU, a larger model or files that are not in the repository);
           tests/test_readme.py still parses its `arbor` commands against the CLI
  stderr   the output shown is stdout then stderr (an error example)
  fails    the command exits non-zero on purpose
  machine  the output depends on the machine (free memory): rewritten, never reported by --check

Commands run in a scratch directory that links the repository's top-level entries (so `docs/…` and
`tests/…` resolve and files a command writes, `bees.txt`, stay out of the checkout), through bash with
`arbor` and `python` meaning this Python and this checkout's code, stdout not a terminal, NO_COLOR set.

    python scripts/readme_outputs.py            # run every runnable block, rewrite README.md
    python scripts/readme_outputs.py --quick    # only the quick blocks
    python scripts/readme_outputs.py --check    # run them, say which blocks differ, write nothing (exit 1)
    python scripts/readme_outputs.py --only eddystone   # blocks whose commands contain the text
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*readme-run:(?P<options>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^```")
OPTIONS = {"quick", "slow", "parse", "stderr", "fails", "machine"}
PROMPT = "$ "
SOURCE_DIRS = ("", "core", "backends", "weights")  # this checkout's packages, as the PREAMBLE's PYTHONPATH
SHELL_PREAMBLE = ('arbor() { "$README_PYTHON" -m arbor_cli "$@"; }\n'
                  'python() { "$README_PYTHON" "$@"; }\n'
                  "export -f arbor python\n")


@dataclass
class Step:
    command: str
    output: list[str]            # the lines shown after the command, blank lines at its end excluded
    blank_after: int = 0         # blank lines between this output and the next command (kept as they are)


@dataclass
class Block:
    marker_line: int             # 1-based line of the marker, for messages
    body_start: int              # index (0-based) of the block's first line inside the fence
    body_end: int                # index of the closing fence
    options: set[str]
    steps: list[Step] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return "parse" not in self.options

    def rendered(self, outputs: list[list[str]] | None = None) -> list[str]:
        lines: list[str] = []
        for i, step in enumerate(self.steps):
            lines.append(PROMPT + step.command)
            lines.extend(step.output if outputs is None else outputs[i])
            lines.extend([""] * step.blank_after)
        return lines


def parse_readme(text: str) -> list[Block]:
    """Every marked block of a README, with its commands and the outputs it shows now."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        options = set(match["options"].replace(",", " ").split())
        if options - OPTIONS or not options & {"quick", "slow", "parse"}:
            raise ValueError(f"README line {i + 1}: a readme-run marker takes quick, slow or parse and any of "
                             f"{sorted(OPTIONS)}; got {match['options'].strip()!r}")
        if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
            raise ValueError(f"README line {i + 1}: a readme-run marker must be followed by a ``` block")
        end = next((j for j in range(i + 2, len(lines)) if FENCE.match(lines[j])), None)
        if end is None:
            raise ValueError(f"README line {i + 2}: the block is never closed")
        block = Block(i + 1, i + 2, end, options, _steps(lines[i + 2:end], i + 3))
        blocks.append(block)
    return blocks


def _steps(body: list[str], first_line: int) -> list[Step]:
    steps: list[Step] = []
    for n, line in enumerate(body):
        if line.startswith(PROMPT):
            steps.append(Step(line[len(PROMPT):], []))
        elif not steps:
            raise ValueError(f"README line {first_line + n}: a marked block must start with a '$ ' command")
        else:
            steps[-1].output.append(line)
    for step in steps:
        while step.output and not step.output[-1].strip():
            step.output.pop()
            step.blank_after += 1
    return steps


def scratch_directory() -> tempfile.TemporaryDirectory:
    """A directory that links the repository's top-level entries: commands see docs/ and tests/, and what
    they write stays out of the checkout."""
    scratch = tempfile.TemporaryDirectory(prefix="arbor-readme-")
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            os.symlink(entry, Path(scratch.name) / entry.name)
    return scratch


def command_environment() -> dict[str, str]:
    env = dict(os.environ, README_PYTHON=sys.executable, NO_COLOR="1", TERM="dumb")
    paths = [str(ROOT / d) if d else str(ROOT) for d in SOURCE_DIRS]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_step(command: str, options: set[str], cwd: str, env: dict[str, str], timeout: float | None = None
             ) -> tuple[list[str], float]:
    """Run one command as the README shows it; its output lines and the seconds it took. A command that
    exits non-zero (or zero, in a block marked fails) is a RuntimeError naming it."""
    started = time.perf_counter()
    result = subprocess.run(["bash", "-o", "pipefail", "-c", SHELL_PREAMBLE + command], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    failed = result.returncode != 0
    if failed != ("fails" in options):
        tail = result.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"`{command}` exited {result.returncode}" + (f": {' / '.join(tail)}" if tail else ""))
    text = result.stdout + (result.stderr if "stderr" in options else "")
    return [line.rstrip() for line in text.rstrip("\n").splitlines()], seconds  # rich pads tables with spaces


def selected(blocks: list[Block], quick: bool, only: str | None) -> list[Block]:
    return [b for b in blocks if b.runnable and (not quick or "quick" in b.options)
            and (only is None or any(only in step.command for step in b.steps))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="say which blocks differ; write nothing")
    parser.add_argument("--quick", action="store_true", help="only the blocks marked quick")
    parser.add_argument("--only", metavar="TEXT", help="only the blocks with a command containing TEXT")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each command")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = selected(parse_readme(text), args.quick, args.only)
    if not blocks:
        print("readme_outputs: no marked block matches", file=sys.stderr)
        return 2
    env, differing, replacements = command_environment(), [], []
    with scratch_directory() as cwd:
        for block in blocks:  # in README order: a later block may read a file an earlier one wrote
            outputs = []
            for step in block.steps:
                output, seconds = run_step(step.command, block.options, cwd, env, args.timeout)
                print(f"{seconds:7.1f} s  $ {step.command}", file=sys.stderr)
                outputs.append(output)
            old, new = block.rendered(), block.rendered(outputs)
            replacements.append((block, new))
            if old != new and "machine" not in block.options:
                differing.append(block)
                print(f"README line {block.marker_line}: the block differs", file=sys.stderr)
                sys.stderr.writelines(line + "\n" for line in difflib.unified_diff(old, new, "README", "now",
                                                                                   lineterm="", n=1))
    if args.check:
        print(f"{len(differing)} of {len(blocks)} blocks differ", file=sys.stderr)
        return 1 if differing else 0
    for block, new in reversed(replacements):  # from the end, so earlier blocks' line numbers hold
        lines[block.body_start:block.body_end] = new
    args.readme.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"rewrote {len(blocks)} blocks of {args.readme} ({len(differing)} changed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
