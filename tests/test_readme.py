"""The README's example commands (issue 32): every `arbor` command in a block marked for
scripts/readme_outputs.py parses against the CLI as it is now (fast, no model), and the blocks marked quick
run on the default model (exit as marked, something on stdout; --words held within its tolerance)."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from arbor_cli.summary_text import count_words, word_limit

ROOT = Path(__file__).resolve().parents[1]
SEPARATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "("}


@functools.cache
def readme_outputs():
    """scripts/readme_outputs.py, imported from its path (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("readme_outputs", ROOT / "scripts" / "readme_outputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def readme_blocks():
    return readme_outputs().parse_readme((ROOT / "README.md").read_text(encoding="utf-8"))


def arbor_invocations(command: str) -> list[list[str]]:
    """The argument lists of every `arbor` in a shell command line (pipes, redirections and `&` split it)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if token in SEPARATORS or set(token) <= set("|&;<>()"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    return [segment[1:] for segment in segments if segment and segment[0] == "arbor"]


def parse_arguments(args: list[str]) -> None:
    """Parse `arbor ARGS` as the CLI would, without running it: an unknown command, option or a bad value raises."""
    import typer

    from arbor_cli.cli import app

    group = typer.main.get_command(app)
    with group.make_context("arbor", list(args)) as ctx:
        command = group.get_command(ctx, args[0])
        assert command is not None, f"arbor has no command {args[0]!r}"
        command.make_context(args[0], list(args[1:]), parent=ctx)


def test_the_readme_marks_its_example_blocks():
    blocks = readme_blocks()
    assert sum("quick" in b.options for b in blocks) >= 3 and sum("slow" in b.options for b in blocks) >= 3
    commands = [step.command for block in blocks for step in block.steps]
    assert any("--words 60" in c and "summarize" in c for c in commands)
    first_lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:4]
    assert first_lines == ["```sh", "pip install torch==2.13.0 -e . && arbor summarize README.md",
                           "pip install torch==2.13.0 -e '.[dev]' && just test", "```"]


def test_every_readme_command_parses_against_the_cli():
    invocations = [(step.command, args) for block in readme_blocks() for step in block.steps
                   for args in arbor_invocations(step.command)]
    assert len(invocations) >= 15
    for command, args in invocations:
        try:
            parse_arguments(args)
        except Exception as e:  # noqa: BLE001 - click's and typer's vendored click's errors alike
            pytest.fail(f"`{command}` no longer parses: {type(e).__name__}: {e}")


def test_a_command_with_a_bad_option_does_not_parse():
    """The check above can fail: an option the CLI does not have, a value it refuses, a command it lacks."""
    for args in (["summarize", "README.md", "--wordz", "60"], ["summarize", "-", "--style"], ["summarise", "x"]):
        with pytest.raises(Exception):
            parse_arguments(args)
    assert arbor_invocations("cat a | arbor summarize - --words 60 > out.txt") == [["summarize", "-", "--words", "60"]]


@pytest.mark.slow
def test_the_quick_readme_blocks_run_on_the_default_model(default_checkpoint):
    """Each quick block's commands exit as marked and print something; a summary asked for --words N has at most
    N×1.25 words (the stated tolerance; issue 32's --words 60 gave 76)."""
    script = readme_outputs()
    env = script.command_environment()
    with script.scratch_directory() as cwd:
        for block in (b for b in readme_blocks() if "quick" in b.options):
            for step in block.steps:
                output, seconds = script.run_step(step.command, block.options, cwd, env, timeout=240)
                assert any(line.strip() for line in output), f"`{step.command}` printed nothing"
                words = re.search(r"summarize .*--words (\d+)", step.command)
                if words:
                    assert count_words("\n".join(output)) <= word_limit(int(words[1])), output
