"""Greedy answers an engine gave, kept in an append-only log under the cache (`engine/`), so a run the
engine broke off resumes where it stopped: what was answered is not asked again."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

ANSWER_LOG_MAX_BYTES = 64 << 20  # the kept answers of one served model; beyond it, the older half goes


def valid_answer(answer) -> bool:
    """What the log keeps: {"text": str, "finish_reason": str}; anything else is never kept nor given back."""
    return (isinstance(answer, dict) and isinstance(answer.get("text"), str)
            and isinstance(answer.get("finish_reason"), str))


class AnswerLog:
    """Greedy answers an engine gave, one JSON line each, keyed by the request: a rerun after a failure
    asks only what was not answered yet. Appends are one write of one line (safe across threads here)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._answers: dict[str, dict] | None = None

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _load(self) -> dict[str, dict]:
        if self._answers is None:
            self._answers = {}
            try:
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                            if valid_answer(row["answer"]):  # else kept by an older arbor: asked again
                                self._answers[row["key"]] = row["answer"]
                        except (ValueError, KeyError, TypeError):
                            continue  # a line cut by a crash: that answer is asked again
            except OSError:
                pass
        return self._answers

    def get(self, body: dict) -> dict | None:
        with self._lock:
            return self._load().get(self.key(body))

    def put(self, body: dict, answer: dict) -> None:
        if not valid_answer(answer):
            raise ValueError(f"not an answer to keep: {answer!r:.80}")  # the caller validates what it keeps
        with self._lock:
            self._load()[self.key(body)] = answer
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._trim()
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": self.key(body), "answer": answer}, ensure_ascii=False) + "\n")
            except OSError:
                pass  # keeping answers is an optimisation

    def _trim(self) -> None:
        try:
            if self.path.stat().st_size <= ANSWER_LOG_MAX_BYTES:
                return
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            temp = self.path.with_name(f".{self.path.name}.tmp")
            temp.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
            os.replace(temp, self.path)
        except OSError:
            pass
