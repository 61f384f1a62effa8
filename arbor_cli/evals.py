"""Long-context evaluations: passkey retrieval and perplexity of the last window, per length and RoPE method.

Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; used by YaRN and LongLoRA): a random
5-digit key is hidden at a chosen depth inside filler text, and the model is asked for it at the end.
A length-L test occupies exactly L positions: L - ANSWER_TOKENS prompt tokens, then ANSWER_TOKENS
greedy tokens, which must contain the key's digits. The context is set to L, so beyond the trained
length the RoPE scaling factor is exactly L / trained.

Perplexity of the last window: the final `window` tokens of a text, each scored with everything
before it inside the last L tokens as context; the same tokens are scored at every L, so only the
context length and the RoPE method change between rows.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from arbor_core.errors import ContextError, OutOfMemoryError, UsageError
from arbor_core.planner import parse_token_counts
from arbor_core.rope import AUTO_METHOD, METHODS, describe_scaling, method_for_context, scaling_for_context

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ASK_QUESTION = "What is the pass key?"  # --via ask: the question a user would type
VIA = ("attention", "ask")
ANSWER_TOKENS = 8
PPL_WINDOW = 256


# ---- options ------------------------------------------------------------------------------
def parse_lengths(spec: str) -> list[int]:
    """'2k,4k,8192' -> [2048, 4096, 8192]: token counts, 'k' meaning 1024, sorted, each once."""
    return sorted(set(parse_token_counts(spec, "--lengths")))


def parse_rope_methods(spec: str) -> list[str]:
    """'auto', one method, or several separated by commas ('none,linear,dynamic,yarn')."""
    methods = [p.strip().lower() for p in spec.split(",") if p.strip()]
    allowed = ("auto", *METHODS)
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise UsageError(f"--rope takes {', '.join(allowed)} (or several, comma-separated); got {spec!r}")
    return list(dict.fromkeys(methods))


# ---- passkey prompts ----------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float  # the depth asked for, 0 = just after the task line, 1 = just before the question
    key_depth: float  # where the key line landed, as a fraction of the filler
    key_position: int  # token index of the key line's first token
    document: tuple[int, int] = (0, 0)  # ids[start:end]: the filler with the key line, without task and question


def split_sentences(text: str) -> list[str]:
    """Sentences of a prose text, whitespace collapsed (paragraph breaks become spaces)."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+(?=\S)", flat) if s]


def repeated_filler() -> Iterator[str]:
    """The papers' filler, sentence by sentence, forever."""
    sentences = split_sentences(FILLER)
    while True:
        yield from sentences


def prose_filler(sentences: list[str], start: int) -> Iterator[str]:
    """A real text's sentences from `start` on, wrapping around at the end."""
    if not sentences:
        raise UsageError("the prose text has no sentences")
    i = start % len(sentences)
    while True:
        yield sentences[i]
        i = (i + 1) % len(sentences)


class SentenceEncoder:
    """Token ids of one sentence as it appears mid-text (after a space), cached: filler repeats."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def __call__(self, sentence: str) -> list[int]:
        ids = self._ids.get(sentence)
        if ids is None:
            ids = self._ids[sentence] = self.tokenizer.encode(" " + sentence)
        return ids


def build_passkey_prompt(encode: SentenceEncoder, prompt_tokens: int, depth: float, key: str,
                         filler: Iterable[str]) -> PasskeyPrompt:
    """Exactly `prompt_tokens` ids: task line, filler with the key line at `depth`, the question.

    The filler is cut to the token budget (its last sentence may end mid-way, as in the papers),
    and the key line goes at the sentence boundary nearest to `depth` of the filler.
    """
    tok = encode.tokenizer
    head = tok.encode(TASK, add_special_tokens=True)
    key_ids = encode(KEY_LINE.format(key=key))
    question = encode(QUESTION)
    budget = prompt_tokens - len(head) - len(key_ids) - len(question)
    if budget < 1:
        raise UsageError(f"a {prompt_tokens}-token prompt is too short for the passkey task "
                         f"(it needs more than {prompt_tokens - budget} tokens)")
    haystack, starts = [], []
    for sentence in filler:
        starts.append(len(haystack))
        haystack.extend(encode(sentence))
        if len(haystack) >= budget:
            break
    haystack = haystack[:budget]
    target = min(max(depth, 0.0), 1.0) * budget
    at = min((s for s in [*starts, budget] if s <= budget), key=lambda s: abs(s - target))
    ids = head + haystack[:at] + key_ids + haystack[at:] + question
    return PasskeyPrompt(ids, key, depth, at / budget, len(head) + at, (len(head), len(ids) - len(question)))


def trial_depth(trial: int, trials: int) -> float:
    """Trials spread evenly over the depth: trial i of N sits at (i + 0.5) / N."""
    return (trial + 0.5) / trials


def trial_key(seed: int, length: int, trial: int) -> str:
    """A 5-digit key that depends only on (seed, length, trial): reruns and subsets reproduce it."""
    return str(random.Random(f"passkey:{seed}:{length}:{trial}").randint(10000, 99999))


def trial_filler(sentences: list[str] | None, seed: int, length: int, trial: int) -> Iterator[str]:
    if sentences is None:
        return repeated_filler()
    start = random.Random(f"prose:{seed}:{length}:{trial}").randrange(len(sentences))
    return prose_filler(sentences, start)


def passkey_prompts(encode: SentenceEncoder, length: int, trials: int, seed: int = 0,
                    prose: list[str] | None = None) -> list[PasskeyPrompt]:
    """The prompts of a length-`length` test: L - ANSWER_TOKENS tokens each, trial i at depth (i + 0.5) / N."""
    return [build_passkey_prompt(encode, length - ANSWER_TOKENS, trial_depth(t, trials), trial_key(seed, length, t),
                                 trial_filler(prose, seed, length, t)) for t in range(trials)]


def passkey_found(answer: str, key: str) -> bool:
    """The score: the continuation contains the key's digits."""
    return key in answer


# ---- passkey runs -------------------------------------------------------------------------
@dataclass
class PasskeyResult:
    length: int
    rope: str  # the method that ran ('none' within the trained context under auto)
    requested: str  # what the user asked for: auto or a method
    scaling: str  # what the method amounts to at this length: 'none', 'yarn x2', ...
    trial: int
    depth: float
    key_depth: float
    key: str
    found: bool | None
    answer: str
    prompt_tokens: int
    seconds: float = 0.0
    error: str | None = None


@dataclass
class PasskeyReport:
    lengths: list[int]
    requested: list[str]
    trials: int
    filler: str
    results: list[PasskeyResult] = field(default_factory=list)

    def accuracy(self) -> dict[str, dict[int, float | None]]:
        """{requested method: {length: fraction found}}; None where the length could not run."""
        table: dict[str, dict[int, float | None]] = {}
        for method in self.requested:
            table[method] = {}
            for length in self.lengths:
                scored = [r.found for r in self.results
                          if r.requested == method and r.length == length and r.found is not None]
                table[method][length] = sum(scored) / len(scored) if scored else None
        return table

    def chosen(self) -> dict[str, dict[int, dict[str, str]]]:
        """{requested method: {length: {"rope": method run, "scaling": what it amounts to}}}."""
        out: dict[str, dict[int, dict[str, str]]] = {}
        for r in self.results:
            out.setdefault(r.requested, {})[r.length] = {"rope": r.rope, "scaling": r.scaling}
        return out

    def to_json(self) -> dict:
        return {"lengths": self.lengths, "rope": self.requested, "trials": self.trials, "filler": self.filler,
                "answer_tokens": ANSWER_TOKENS, "auto_rope_method": AUTO_METHOD,
                "rope_chosen": {m: {str(k): v for k, v in c.items()} for m, c in self.chosen().items()},
                "accuracy": {m: {str(k): v for k, v in a.items()} for m, a in self.accuracy().items()},
                "results": [asdict(r) for r in self.results]}


def run_passkey(model, lengths: list[int], methods: list[str], trials: int, seed: int = 0,
                prose: list[str] | None = None, filler_name: str = "repeat",
                on_result: Callable[[PasskeyResult], None] = lambda r: None, via: str = "attention") -> PasskeyReport:
    """Every (length, method, trial): build the prompt, answer greedily, score.

    Runs whose RoPE is the same (every method within the trained context is plain RoPE) are run
    once and their outcome shared, since the computation is identical.
    via "ask": the same document (filler and key line, without the task line) goes through arbor ask
    (ask.py) with ASK_QUESTION instead of one attention pass; its column is named "ask".
    """
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    if via not in VIA:
        raise UsageError(f"--via must be {' or '.join(VIA)}, got {via!r}")
    if via == "ask":
        methods = ["ask"]
    report = PasskeyReport(lengths, methods, trials, filler_name)
    encode = SentenceEncoder(model.tokenizer)
    for length in lengths:
        prompts = passkey_prompts(encode, length, trials, seed, prose)
        done: dict[tuple, PasskeyResult] = {}
        for method in methods:
            for trial, prompt in enumerate(prompts):
                if via == "ask":
                    result = _passkey_ask_trial(model, length, trial, prompt)
                else:
                    result = _passkey_trial(model, length, method, trial, prompt, done)
                report.results.append(result)
                on_result(result)
    return report


def _passkey_ask_trial(model, length: int, trial: int, prompt: PasskeyPrompt) -> PasskeyResult:
    """One trial through arbor ask: the document read part by part (nothing kept on disk)."""
    from .ask import ask

    document = model.tokenizer.decode(prompt.ids[prompt.document[0]:prompt.document[1]])
    t0 = time.perf_counter()
    answer = ask(model, document, ASK_QUESTION, keep=False)
    return PasskeyResult(length, "ask", "ask", f"{answer.path}, {answer.parts} parts", trial, prompt.depth,
                         prompt.key_depth, prompt.key, passkey_found(answer.text, prompt.key), answer.text,
                         answer.tokens, time.perf_counter() - t0)


def _passkey_trial(model, length: int, requested: str, trial: int, prompt: PasskeyPrompt,
                   done: dict[tuple, PasskeyResult]) -> PasskeyResult:
    rope = method_for_context(model.config, length, requested)
    scaling = scaling_for_context(model.config, length, rope)
    same_run = (json.dumps(scaling, sort_keys=True), trial)
    result = PasskeyResult(length, rope, requested, describe_scaling(model.config, length, rope), trial,
                           prompt.depth, prompt.key_depth, prompt.key, None, "", len(prompt.ids))
    if same_run in done:
        earlier = done[same_run]
        result.found, result.answer, result.seconds, result.error = (earlier.found, earlier.answer, earlier.seconds,
                                                                     earlier.error)
        return result
    t0 = time.perf_counter()
    try:
        answer = model.generate(prompt.ids, max_new_tokens=ANSWER_TOKENS, context=length, rope=rope).text
        result.found, result.answer = passkey_found(answer, prompt.key), answer
    except (ContextError, OutOfMemoryError) as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - t0
    done[same_run] = result
    return result


# ---- perplexity ---------------------------------------------------------------------------
@dataclass
class PerplexityRow:
    length: int
    rope: str
    requested: str
    scaling: str
    window: int
    nll: float | None = None  # mean negative log-likelihood per token over the window, in nats
    perplexity: float | None = None
    seconds: float = 0.0
    error: str | None = None


def run_perplexity(model, ids: list[int], lengths: list[int], methods: list[str], window: int = PPL_WINDOW,
                   on_row: Callable[[PerplexityRow], None] = lambda r: None,
                   on_skip: Callable[[int, str], None] = lambda length, why: None) -> list[PerplexityRow]:
    """Perplexity of the text's last `window` tokens with the preceding L - window tokens as context."""
    if window < 1:
        raise UsageError("--window must be at least 1")
    rows = []
    for length in lengths:
        why = _cannot_score(length, len(ids), window)
        if why:
            on_skip(length, why)
            continue
        done: dict[str, PerplexityRow] = {}  # methods that run the same RoPE share one run
        for requested in methods:
            row = _perplexity_row(model, ids[-length:], length, requested, window, done)
            rows.append(row)
            on_row(row)
    return rows


def _cannot_score(length: int, available: int, window: int) -> str | None:
    if available < length:
        return f"the text has {available:,} tokens, fewer than {length:,}"
    if length <= window:
        return f"{length:,} tokens leave no context before the {window}-token window"
    return None


def _perplexity_row(model, ids: list[int], length: int, requested: str, window: int,
                    done: dict[str, PerplexityRow]) -> PerplexityRow:
    rope = method_for_context(model.config, length, requested)
    row = PerplexityRow(length, rope, requested, describe_scaling(model.config, length, rope), window)
    same_run = json.dumps(scaling_for_context(model.config, length, rope), sort_keys=True)
    if same_run in done:
        earlier = done[same_run]
        row.nll, row.perplexity, row.seconds, row.error = earlier.nll, earlier.perplexity, earlier.seconds, earlier.error
        return row
    done[same_run] = row
    t0 = time.perf_counter()
    try:
        nll = model.score(ids, window, rope=rope)
        row.nll, row.perplexity = nll, math.exp(nll)
    except (ContextError, OutOfMemoryError) as e:
        row.error = str(e)
    row.seconds = time.perf_counter() - t0
    return row
