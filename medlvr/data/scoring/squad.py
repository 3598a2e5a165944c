"""SQuAD-style exact match and token F1 for short open answers.

Written from rajpurkar/SQuAD-explorer@eee5fdbf62f8613a7812b03419e6b29617b74fd1,
``evaluate-v2.0.py`` (the official SQuAD 2.0 script; its v1.1 predecessor has the same
``normalize_answer`` and F1): ``normalize_answer``, ``get_tokens``, ``compute_exact``,
``compute_f1``, with one gold answer.

Normalisation: lower-case, delete every ASCII punctuation character (``string.punctuation``:
"x-ray" -> "xray", "3.5 cm" -> "35 cm"), replace the words a / an / the by spaces, collapse
whitespace. ``correct`` is exact match; ``value`` is F1 over token multisets (an empty side
scores 1 only when both are empty).
"""
from __future__ import annotations

import re
import string
from collections import Counter

from medlvr.data.scoring._base import Fields, Score, takes_record

SOURCE = "rajpurkar/SQuAD-explorer@eee5fdbf62f8613a7812b03419e6b29617b74fd1:evaluate-v2.0.py:compute_exact,compute_f1"

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    t = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", t).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split() if text else []


def exact(gold: str, prediction: str) -> int:
    return int(normalize(gold) == normalize(prediction))


def f1(gold: str, prediction: str) -> float:
    g, p = tokens(gold), tokens(prediction)
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


@takes_record
def score(prediction: str, f: Fields) -> Score:
    em, f1_ = exact(f.answer, prediction), f1(f.answer, prediction)
    return Score(correct=em == 1, value=f1_, extras={"exact": float(em), "f1": f1_})


__all__ = ["score", "normalize", "tokens", "exact", "f1", "SOURCE"]
