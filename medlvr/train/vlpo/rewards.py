"""Outcome rewards for VLPO (stage 2): a registry of named rewards, each with its weight.

A rollout's reward is the weighted sum of every registered reward, each in [0, 1]::

    reward = sum_name  w_name * reward_name(text, stopped, record)

A reward is ``fn(text, stopped, record, cfg) -> float`` registered with :func:`register_reward`; its
weight is a number or a function of the VLPOConfig. VLPO (medlvr/train/vlpo/objective.py)
computes every registered reward and reports each under its name, so a new reward is a
function plus one registration. The two built in:

- "accuracy" (weight ``--w-accuracy``): the scoring protocol ``--reward-protocol`` (medlvr/data/scoring/;
  default "medlvr", medlvr's own rule, ``medlvr.data.answers.score``: the same scorer the demo's evaluation
uses, so the training signal and the reported accuracy cannot drift apart);
- "format" (weight ``--w-format``) checks the things a grader needs to read the answer at all: the sample stopped on
``<|im_end|>`` (it was not truncated), the text is not empty, and for a multiple-choice
question it names one of the options (by letter or by text).
"""
from __future__ import annotations

import re
import string
from typing import Any, Callable, Mapping, Sequence

from medlvr.data.scoring import score_with
from medlvr.registry import Entry, Registry

__all__ = ["Reward", "REWARDS", "register_reward", "unregister_reward", "reward_weights", "format_reward",
           "accuracy_reward", "outcome_rewards", "match_option"]

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


def accuracy_reward(text: str, record: Any, *, protocol: str = "medlvr") -> float:
    """Correctness of ``text`` for ``record`` in [0, 1] under the scoring ``protocol``. Train with
    a strict one: the benchmark toolkits' multiple-choice rules accept non-answers (docs/scoring.md)."""
    return float(score_with(protocol, text, record).correct)


Reward = Entry  # name, fn(text, stopped, record, cfg) -> float in [0, 1], weight

REWARDS = Registry("reward", reserved=("reward",), signature="(text, stopped, record, cfg) -> float",
                   negative_weights=True)


def register_reward(name: str, fn: Callable[[str, bool, Any, Any], float], *,
                    weight: float | Callable[[Any], float] = 1.0) -> Reward:
    """Add a reward ``fn(text, stopped, record, cfg) -> float in [0, 1]`` under ``name``, at
    ``weight`` (a number, or a function of the VLPOConfig ``cfg``)."""
    return REWARDS.register(name, fn, weight=weight)


def unregister_reward(name: str) -> None:
    REWARDS.unregister(name)


def reward_weights(cfg: Any) -> dict[str, float]:
    """name -> weight of every registered reward under the config ``cfg``."""
    return REWARDS.weights(cfg)


def outcome_rewards(texts: Sequence[str], stopped: Sequence[bool], records: Sequence[Any], *,
                    weights: Mapping[str, float] | None = None, cfg: Any = None) -> dict[str, list[float]]:
    """Per-rollout rewards. ``records[i]`` is the record rollout i answers (repeat each record n
    times for n rollouts); cfg: the VLPOConfig the rewards read (default: the default one);
    weights: name -> weight (default: :func:`reward_weights` of ``cfg``); a registered reward
    left out of ``weights`` is computed and reported at weight 0. Returns {"reward", and one list
    per registered reward}."""
    if not (len(texts) == len(stopped) == len(records)):
        raise ValueError(f"texts, stopped and records must have the same length, got "
                         f"{len(texts)}, {len(stopped)}, {len(records)}")
    if cfg is None:
        from medlvr.train.vlpo.config import VLPOConfig

        cfg = VLPOConfig()
    if weights is None:
        weights = reward_weights(cfg)
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"weights: no reward named {unknown}; registered: {sorted(REWARDS)}")
    out: dict[str, list[float]] = {}
    total = [0.0] * len(texts)
    for name, r in REWARDS.items():
        values = [float(r.fn(t, bool(s), rec, cfg)) for t, s, rec in zip(texts, stopped, records)]
        out[name] = values
        w = weights.get(name, 0.0)
        total = [acc + w * v for acc, v in zip(total, values)]
    return {"reward": total, **out}


register_reward("accuracy", lambda text, stopped, record, cfg: accuracy_reward(text, record,
                                                                             protocol=cfg.reward_protocol),
                weight=lambda cfg: cfg.w_accuracy)
register_reward("format", lambda text, stopped, record, cfg: format_reward(text, stopped=stopped,
                                                                           options=getattr(record, "options", None)),
                weight=lambda cfg: cfg.w_format)
