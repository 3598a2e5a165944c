"""Outcome rewards for VLPO (stage 2): answer accuracy and answer format.

A rollout's reward is ``w_acc * accuracy + w_fmt * format`` where both terms are in
[0, 1]. Accuracy comes from ``medlvr.data.answers.score`` (the same scorer the evaluation
uses, so the training signal and the reported accuracy cannot drift apart); format
checks the things a grader needs to read the answer at all: the sample stopped on
``<|im_end|>`` (it was not truncated), the text is not empty, and for a multiple-choice
question it names one of the options (by letter or by text).
"""
from __future__ import annotations

import re
import string
from typing import Any, Sequence

from medlvr.data.answers import score

__all__ = ["format_reward", "accuracy_reward", "outcome_rewards", "match_option"]

_LETTERS = string.ascii_uppercase


def _norm(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .,:;!?\"'()[]")


def match_option(answer: str, options: Sequence[str]) -> int | None:
    """Index of the option an answer names, or None.

    Accepted forms: the option letter alone ("B", "(B)", "B."), a letter followed by the
    option text ("B. pneumonia"), or the option text alone (case/punctuation-insensitive).
    """
    text = answer.strip()
    if not text:
        return None
    # "B", "(B)", "B.", "B)", "B: ..." — a leading letter counts only when it is a whole
    # token, so an answer like "Atelectasis" is not read as option A.
    m = re.match(r"^\(?([A-Za-z])\)?(?:[.):\s]|$)", text)
    if m is not None:
        idx = _LETTERS.index(m.group(1).upper())
        if idx < len(options):
            return idx
    norm = _norm(text)
    for i, opt in enumerate(options):
        if norm == _norm(opt):
            return i
    return None


def format_reward(text: str, *, stopped: bool, options: Sequence[str] | None) -> float:
    """1.0 when the answer is well-formed, else 0.0 (see module docstring)."""
    if not stopped or not text.strip():
        return 0.0
    if options:
        return 1.0 if match_option(text, options) is not None else 0.0
    return 1.0


def accuracy_reward(text: str, record: Any) -> float:
    """Correctness of ``text`` for ``record`` in [0, 1], via medlvr.data.answers.score."""
    return float(score(text, record))


def outcome_rewards(texts: Sequence[str], stopped: Sequence[bool], records: Sequence[Any], *,
                    w_accuracy: float = 1.0, w_format: float = 0.1) -> dict[str, list[float]]:
    """Per-rollout rewards. ``records[i]`` is the record rollout i answers (repeat each
    record n times for n rollouts). Returns {"reward", "accuracy", "format"} lists."""
    if not (len(texts) == len(stopped) == len(records)):
        raise ValueError(f"texts, stopped and records must have the same length, got "
                         f"{len(texts)}, {len(stopped)}, {len(records)}")
    acc = [accuracy_reward(t, r) for t, r in zip(texts, records)]
    fmt = [format_reward(t, stopped=s, options=getattr(r, "options", None))
           for t, s, r in zip(texts, stopped, records)]
    rew = [w_accuracy * a + w_format * f for a, f in zip(acc, fmt)]
    return {"reward": rew, "accuracy": acc, "format": fmt}
