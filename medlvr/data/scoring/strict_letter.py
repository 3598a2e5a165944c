"""Strict answers in ``<answer>`` tags, as the R1-style medical VLMs score them.

- ``med_r1``: Yuxiang-Lai117/Med-R1@88d76c73e7d21cd958a2b2dc32eca038be766f8f,
  ``src/eval_vqa/test_qwen2_5vl_vqa.py``: ``extract_option_answer`` and the scoring loop. The
  first ``<answer>\\s*(\\w+)\\s*</answer>`` match of the reply must equal the gold letter exactly
  (the gold letter is read from ``"<answer> C </answer>"`` the same way). Case-sensitive ("c" is
  wrong), word characters only ("C)" or "C. text" inside the tags never match), no tags -> wrong,
  "AC" is the "letter" AC -> wrong.
- ``med_r1_nothink``: ``src/eval_vqa/test_qwen2_5vl_vqa_nothink.py``: as above when the reply
  contains the substring "answer" anywhere; otherwise the WHOLE reply (unstripped) is compared with
  the letter, so a bare "C" is right and "C." or "c" wrong.
- ``medvlthinker``: UCSC-VLAA/MedVLThinker@a3163b1663b21cb300e93850c397917c3a4be612,
  ``eval/run_offline_inference_v2.py``: ``extract_answer`` (first ``<answer>(.*?)</answer>``,
  DOTALL, stripped; the whole stripped reply when there is none) and ``grade_answer`` (case-
  insensitive equality with "<letter>. <text>", with the letter, or with the gold text). The
  letter is None for records without options, leaving the text comparison. Its training reward
  (``train/my_reward.py``) grades the same way but matches tags without DOTALL and first requires
  the whole reply to be ``<think>...</think><answer>...</answer>`` — not this protocol.

The gold letter is that of the first option equal to the gold text (else equal after medlvr's
``normalize_answer``), the position the option has in the prompt.
"""
from __future__ import annotations

import re

from medlvr.data.scoring._base import Fields, LETTERS, Score, answer_index, takes_record

SOURCE_MED_R1 = "Yuxiang-Lai117/Med-R1@88d76c73e7d21cd958a2b2dc32eca038be766f8f"
SOURCE_MEDVLTHINKER = "UCSC-VLAA/MedVLThinker@a3163b1663b21cb300e93850c397917c3a4be612"

_MED_R1_TAG = re.compile(r"<answer>\s*(\w+)\s*</answer>")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def med_r1_extract(reply: str) -> str | None:
    m = _MED_R1_TAG.search(reply)
    return m.group(1) if m else None


@takes_record
def score_med_r1(prediction: str, f: Fields) -> Score:
    letter = LETTERS[answer_index(f)]
    got = med_r1_extract(prediction)
    return Score(correct=got is not None and got == letter, extras={"extracted": got})


@takes_record
def score_med_r1_nothink(prediction: str, f: Fields) -> Score:
    letter = LETTERS[answer_index(f)]
    got = med_r1_extract(prediction) if "answer" in prediction else prediction
    return Score(correct=got is not None and got == letter, extras={"extracted": got})


def medvlthinker_extract(reply: str) -> str:
    text = reply.strip()
    m = _TAG.search(text)
    return m.group(1).strip() if m else text.strip()


def medvlthinker_grade(prediction: str, answer: str, label: str | None) -> bool:
    p = prediction.strip().lower()
    if label is not None and (p == f"{label}. {answer}".strip().lower() or p == label.strip().lower()):
        return True
    return p == answer.strip().lower()


@takes_record
def score_medvlthinker(prediction: str, f: Fields) -> Score:
    label = LETTERS[answer_index(f)] if f.options else None
    got = medvlthinker_extract(prediction)
    return Score(correct=medvlthinker_grade(got, f.answer, label), extras={"extracted": got})


__all__ = ["score_med_r1", "score_med_r1_nothink", "score_medvlthinker", "med_r1_extract",
           "medvlthinker_extract", "medvlthinker_grade"]
