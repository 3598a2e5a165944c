"""LLaVA-Med's VQA scoring (VQA-RAD, SLAKE, PathVQA): closed (yes/no) and open questions.

Written from microsoft/LLaVA-Med (v1.0 evaluation code; the v1.5 tree, 821e1c7 and later, no
longer ships it):

- ``llava/eval/run_eval.py:evaluate`` at b9a98a736d2ef05bcf5ff345be6403fb3a664eaf ("fix closed
  accuracy calculation (#35)"): the CLOSED branch (``llava_med_closed``) and the OPEN branch's
  token recall / precision / F1 (``llava_med_open``);
- the same function as first released, ad758b687d4e79628dbfdb149dc545641ed29014 ("init release",
  unchanged until the fix): ``llava_med_closed_as_released``;
- ``llava/eval/run_eval_batch.py:evaluate`` at b9a98a7 (the README's batch evaluation):
  ``llava_med_closed_batch`` and ``llava_med_open_hit``;
- ``llava/eval/eval_metrics/glossary.py:normalize_word`` and
  ``llava/eval/eval_metrics/evaluate_metrics.py:calculate_f1score``, ``calculate_exactmatch``
  (``eval_metrics/utils.py:split_sentence``), identical at both commits.

Both sides are lower-cased and passed through ``normalize_word``: the punctuation
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` becomes a space (or is deleted outright when the
text has that mark next to a space, or has a digit-comma-digit anywhere), a "." not followed by
a digit is deleted (at most 32 of them: ``re.UNICODE`` is passed as the ``count`` argument),
"none", "zero" .. "ten" become "0" .. "10", the articles a / an / the are dropped, remaining
commas are deleted. Not reproduced: its table of ~130 apostrophe-less contractions ("dont" ->
"don't"), which changes a result only when one side spells a contraction with and the other
without its apostrophe.

- closed (``llava_med_closed``): correct when "yes" or "no" occurs as a substring of the
  normalised prediction and the normalised gold does too ("Yes, no abnormality is seen" is right
  for gold yes; "nodule", "normal", "not", "know" all mention "no"; "yesno" is right for yes).
- ``llava_med_closed_as_released``: the same, except that a prediction mentioning yes/no but not
  the gold appended no hit at all: the record leaves the denominator (``counted`` False).
- open (``llava_med_open``): ``value`` is the token recall of ``calculate_f1score`` — the LLaVA-Med
  paper's open-question number — with tp counted on the PREDICTION's token counts (a repeated
  word can raise recall); extras: precision, f1 and ``calculate_exactmatch`` (distinct gold
  tokens found / prediction token count, despite its name). ``correct`` is recall == 1 (every
  gold token present): medlvr's reading for a right/wrong view, not a number the toolkit prints.
- batch script: closed ``llava_med_closed_batch`` and open ``llava_med_open_hit`` are both
  "normalised gold is a substring of the normalised prediction" (gold "2" is found in "12").
"""
from __future__ import annotations

import re
from collections import Counter

from medlvr.data.scoring._base import Fields, Score, takes_record

SOURCE_FIXED = "microsoft/LLaVA-Med@b9a98a736d2ef05bcf5ff345be6403fb3a664eaf"
SOURCE_RELEASED = "microsoft/LLaVA-Med@ad758b687d4e79628dbfdb149dc545641ed29014"

KNOWN_BUG_CLOSED = ("LLaVA-Med's released run_eval.py appends no hit for a wrong yes/no answer, so "
                    "wrong answers leave the denominator and closed accuracy is inflated (fixed in b9a98a7, "
                    "'fix closed accuracy calculation (#35)').")

_MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The toolkit writes "(?!<=\d)(\.)(?!\d)": a mistyped look-behind that is a look-ahead for "<=",
# which a "." never is; the pattern is a "." not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")


def normalize_word(text: str) -> str:
    """LLaVA-Med's ``normalize_word`` (without its contractions table)."""
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _MARKS:
        delete = digit_comma or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if delete else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def _prepare(prediction: str, answer: str) -> tuple[str, str]:
    # evaluate(): both lower-cased, then normalize_word
    return normalize_word(prediction.lower()), normalize_word(answer.lower())


def _tokens(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def f1_precision_recall(candidate: str, reference: str) -> tuple[float, float, float]:
    """``calculate_f1score`` (it normalises its inputs once more)."""
    cand, ref = _tokens(normalize_word(candidate)), _tokens(normalize_word(reference))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(candidate: str, reference: str) -> float:
    """``calculate_exactmatch``: distinct reference tokens present / candidate token count."""
    cand, ref = _tokens(normalize_word(candidate)), _tokens(normalize_word(reference))
    total = sum(cand.values())
    if total == 0:
        return 0.0
    return sum(1 for w in ref if w in cand) / total


def _mentions_yes_no(p: str) -> bool:
    return "yes" in p or "no" in p


@takes_record
def score_closed(prediction: str, f: Fields) -> Score:
    p, g = _prepare(prediction, f.answer)
    return Score(correct=_mentions_yes_no(p) and g in p)


@takes_record
def score_closed_as_released(prediction: str, f: Fields) -> Score:
    p, g = _prepare(prediction, f.answer)
    if not _mentions_yes_no(p):
        return Score(correct=False)
    if g in p:
        return Score(correct=True)
    return Score(correct=False, counted=False)


@takes_record
def score_hit(prediction: str, f: Fields) -> Score:
    """run_eval_batch.py's rule, for closed and open questions alike: the prepared gold is a
    substring of the prepared reply."""
    p, g = _prepare(prediction, f.answer)
    return Score(correct=g in p)


score_closed_batch = score_open_hit = score_hit


@takes_record
def score_open(prediction: str, f: Fields) -> Score:
    p, g = _prepare(prediction, f.answer)
    f1, precision, recall = f1_precision_recall(p, g)
    return Score(correct=recall == 1.0, value=recall,
                 extras={"recall": recall, "precision": precision, "f1": f1, "exact": exact_match(p, g)})




@takes_record
def score(prediction: str, f: Fields) -> Score:
    """Yes/no gold -> the closed rule (fixed), else the open rule (recall)."""
    if f.answer.strip().lower() in ("yes", "no"):
        return score_closed(prediction, f)
    return score_open(prediction, f)


__all__ = ["score", "score_closed", "score_closed_as_released", "score_closed_batch", "score_open",
           "score_open_hit", "normalize_word", "f1_precision_recall", "exact_match", "KNOWN_BUG_CLOSED"]
