"""The named scoring protocols, the default, and `score_with`."""
from __future__ import annotations

from collections.abc import Iterable

from medlvr.data.scoring import llava_med, medevalkit, medlvr_rule, omnimedvqa, squad, strict_letter
from medlvr.data.scoring._base import CHOICE, KINDS, OPEN, YES_NO, Judge, Score, ScoringProtocol

_ALL = frozenset(KINDS)
_MC = frozenset({CHOICE})
_YN = frozenset({YES_NO})
_NOMC = frozenset({YES_NO, OPEN})

_MEK = medevalkit.SOURCE
_LMF = llava_med.SOURCE_FIXED
_LMR = llava_med.SOURCE_RELEASED

#: The protocol `score_with` and the integrations use when none is named.
DEFAULT_PROTOCOL = "medevalkit"

PROTOCOLS: dict[str, ScoringProtocol] = {p.name: p for p in (
    ScoringProtocol(
        "medevalkit", medevalkit.score, _ALL,
        f"{_MEK}:utils/utils.py:judge_multi_choice,judge_judgement,judge_open_end_vqa "
        "(via utils/OmniMedVQA/OmniMedVQA.py, utils/VQA_RAD/VQA_RAD.py:cal_metrics)",
        "the default: options -> medevalkit_mc, yes/no gold -> medevalkit_closed, else medevalkit_open",
        accepts_judge=True),
    ScoringProtocol(
        "medevalkit_mc", medevalkit.score_mc, _MC,
        f"{_MEK}:utils/utils.py:judge_multi_choice (utils/OmniMedVQA/OmniMedVQA.py:construct_messages,cal_metrics)",
        "letter / option text / 'answer is X' / \\boxed{} / <answer>, else the most similar option line"),
    ScoringProtocol(
        "medevalkit_closed", medevalkit.score_closed, _YN,
        f"{_MEK}:utils/utils.py:judge_judgement (utils/VQA_RAD/VQA_RAD.py:cal_metrics)",
        "exactly one of the substrings yes / no in the parsed reply, and it is the gold"),
    ScoringProtocol(
        "medevalkit_close_end", medevalkit.score_close_end, _NOMC,
        f"{_MEK}:utils/utils.py:judge_close_end_vqa (utils/SLAKE/SLAKE.py:cal_metrics)",
        "parsed reply without '.' and newlines equals the gold (SLAKE CLOSED, not yes/no)"),
    ScoringProtocol(
        "medevalkit_open", medevalkit.score_open, _NOMC,
        f"{_MEK}:utils/utils.py:judge_open_end_vqa,calculate_f1 (utils/VQA_RAD/VQA_RAD.py:cal_metrics)",
        "exact string match of the parsed reply (extras: token-set precision / recall / F1); judge optional",
        accepts_judge=True),
    ScoringProtocol(
        "omnimedvqa", omnimedvqa.score, _MC, omnimedvqa.SOURCE,
        "OmniMedVQA's official scorer: most similar option text (difflib), A-D, must equal the gold exactly"),
    ScoringProtocol(
        "med_r1", strict_letter.score_med_r1, _MC,
        f"{strict_letter.SOURCE_MED_R1}:src/eval_vqa/test_qwen2_5vl_vqa.py:extract_option_answer",
        "<answer>\\s*(\\w+)\\s*</answer> must equal the gold letter (case-sensitive)"),
    ScoringProtocol(
        "med_r1_nothink", strict_letter.score_med_r1_nothink, _MC,
        f"{strict_letter.SOURCE_MED_R1}:src/eval_vqa/test_qwen2_5vl_vqa_nothink.py:extract_option_answer",
        "as med_r1 when the reply contains 'answer', else the whole reply must be the letter"),
    ScoringProtocol(
        "medvlthinker", strict_letter.score_medvlthinker, _ALL,
        f"{strict_letter.SOURCE_MEDVLTHINKER}:eval/run_offline_inference_v2.py:extract_answer,grade_answer",
        "<answer> content (or the reply), case-insensitively equal to 'X. text', the letter or the text"),
    ScoringProtocol(
        "llava_med", llava_med.score, _NOMC,
        f"{_LMF}:llava/eval/run_eval.py:evaluate",
        "yes/no gold -> llava_med_closed, else llava_med_open"),
    ScoringProtocol(
        "llava_med_closed", llava_med.score_closed, _NOMC,
        f"{_LMF}:llava/eval/run_eval.py:evaluate (CLOSED branch)",
        "prediction mentions yes or no (substring) and contains the gold"),
    ScoringProtocol(
        "llava_med_closed_as_released", llava_med.score_closed_as_released, _NOMC,
        f"{_LMR}:llava/eval/run_eval.py:evaluate (CLOSED branch)",
        "as llava_med_closed, but a wrong answer that mentions yes/no is left out of the denominator",
        known_bug=llava_med.KNOWN_BUG_CLOSED),
    ScoringProtocol(
        "llava_med_closed_batch", llava_med.score_closed_batch, _NOMC,
        f"{_LMF}:llava/eval/run_eval_batch.py:evaluate (CLOSED branch)",
        "normalised gold is a substring of the normalised prediction"),
    ScoringProtocol(
        "llava_med_open", llava_med.score_open, _NOMC,
        f"{_LMF}:llava/eval/run_eval.py:evaluate (OPEN branch), eval_metrics/evaluate_metrics.py:calculate_f1score",
        "value = token recall of the gold (the paper's open number); correct = recall 1"),
    ScoringProtocol(
        "llava_med_open_hit", llava_med.score_open_hit, _NOMC,
        f"{_LMF}:llava/eval/run_eval_batch.py:evaluate (OPEN branch, open_hit_scores)",
        "normalised gold is a substring of the normalised prediction"),
    ScoringProtocol(
        "squad", squad.score, _NOMC, squad.SOURCE,
        "SQuAD normalisation; correct = exact match, value = token F1"),
    ScoringProtocol(
        "medlvr", medlvr_rule.score, _ALL, medlvr_rule.SOURCE,
        "medlvr's rule before the protocols (medlvr.data.answers.score), unchanged"),
)}


def protocol_names() -> list[str]:
    return list(PROTOCOLS)


def protocol(name: str | None = None) -> ScoringProtocol:
    """The protocol called `name` (`DEFAULT_PROTOCOL` for None). An unknown name raises
    ValueError listing the known ones."""
    if name is None:
        name = DEFAULT_PROTOCOL
    if not isinstance(name, str):
        raise TypeError(f"name: expected a scoring protocol name (str), got {type(name).__name__}")
    if name not in PROTOCOLS:
        raise ValueError(f"name: unknown scoring protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def score_with(name: str | None, prediction: str, record, *, judge: Judge | None = None) -> Score:
    """Score one prediction for one record with the named protocol (None: the default)."""
    return protocol(name)(prediction, record, judge=judge)


def score_all(name: str | None, predictions: Iterable[str], records: Iterable, *,
              judge: Judge | None = None) -> list[Score]:
    """`score_with` over paired predictions and records (equal lengths)."""
    predictions, records = list(predictions), list(records)
    if len(predictions) != len(records):
        raise ValueError(f"predictions: expected one per record, got {len(predictions)} for {len(records)} records")
    p = protocol(name)
    return [p(pred, rec, judge=judge) for pred, rec in zip(predictions, records)]


__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "protocol", "protocol_names", "score_with", "score_all"]
