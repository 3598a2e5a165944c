"""medlvr's own rule, unchanged: `medlvr.data.answers.score`.

Multiple choice: the option named by its (normalised) text or by a leading letter ("B", "B.",
"(b)", "b) text" with the option's text) must be the gold; yes/no gold: the FIRST word of the
normalised prediction in {yes, y, true, present, positive} / {no, n, false, absent, negative};
otherwise exact match after `normalize_answer` (lower-case, punctuation to spaces, articles
dropped). The rule the training and evaluation code used before the protocols existed; kept so
that earlier numbers can be reproduced, not the default.
"""
from __future__ import annotations

from types import SimpleNamespace

from medlvr.data.scoring._base import Fields, Score, takes_record

SOURCE = "medlvr@89be64f6f3d9316ac426282cbf3d43724e156bce:medlvr/data/answers.py:score"


@takes_record
def score(prediction: str, f: Fields) -> Score:
    from medlvr.data.answers import score as _score

    record = SimpleNamespace(answer=f.answer, options=list(f.options) if f.options else None)
    return Score(correct=_score(prediction, record))


__all__ = ["score", "SOURCE"]
