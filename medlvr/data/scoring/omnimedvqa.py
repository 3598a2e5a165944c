"""OmniMedVQA's official scorer (the benchmark authors' code in Multi-Modality-Arena's MedicalEval).

Written from OpenGVLab/Multi-Modality-Arena@bd2999a3be2bf4539a7e071cf2cfab5822f66417,
``MedicalEval/Question-answering_Score/utils/medicalqa.py``: ``MedicalEval``,
``find_most_similar_index``, ``str_similarity`` (last changed in 76d6302 "init med eval").

The rule: the options are option_A, option_B and, when present, option_C and option_D; the
prediction picks the option whose ``difflib.SequenceMatcher(None, option, prediction).ratio()``
is highest (the first on ties); correct when that option's text equals the gold text exactly.
What follows from it (each pinned by a case in tests/data/scoring_cases/omnimedvqa.jsonl):

- letters are not read as letters: a reply "B" is compared character by character with the
  option texts, so it picks the option text that shares a "B" (none among CT / MRI / X-ray /
  Ultrasound: wrong, whatever the gold); "Answer: C" is scored by its characters too (wrong on
  the TB case), while "C) manifestation of TB" is right because its text matches;
- case matters (the ratio is case-sensitive) and the gold comparison is exact: a record whose
  gold differs from its option only in case can never be right;
- when no option shares a single character with the prediction (an empty reply), the index is
  None, ``answer_list[None]`` raises inside ``MedicalEval``'s ``try`` and the record counts as
  wrong (it stays in ``tot``);
- a fifth option (option_E) is never considered.
"""
from __future__ import annotations

import difflib

from medlvr.data.scoring._base import Fields, LETTERS, Score, takes_record

SOURCE = ("OpenGVLab/Multi-Modality-Arena@bd2999a3be2bf4539a7e071cf2cfab5822f66417:"
          "MedicalEval/Question-answering_Score/utils/medicalqa.py:MedicalEval")


def most_similar_option(options, prediction: str) -> int | None:
    """Index of the first option with the highest difflib ratio to `prediction`; None when every
    ratio is 0."""
    best, best_i = 0.0, None
    for i, option in enumerate(options):
        r = difflib.SequenceMatcher(None, option, prediction).ratio()
        if r > best:
            best, best_i = r, i
    return best_i


@takes_record
def score(prediction: str, f: Fields) -> Score:
    options = f.options[:4]
    i = most_similar_option(options, prediction)
    if i is None:
        return Score(correct=False, extras={"chosen": None})
    return Score(correct=options[i] == f.answer, extras={"chosen": LETTERS[i]})


__all__ = ["score", "most_similar_option", "SOURCE"]
