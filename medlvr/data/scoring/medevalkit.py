"""MedEvalKit's rules: multiple choice, yes/no ("judgement"), closed short answers, open answers.

Written from alibaba-damo-academy/MedEvalKit@9b12e3b34232a8779cc1275417bf4f72f03d28e0:

- ``utils/utils.py``: ``judge_multi_choice``, ``parse_response``, ``find_most_similar_index``,
  ``str_similarity``, ``extract`` / ``get_content_between_a_b``, ``judge_judgement``,
  ``judge_close_end_vqa``, ``judge_open_end_vqa``, ``calculate_f1``, ``get_compare_messages``;
- ``utils/OmniMedVQA/OmniMedVQA.py``: ``construct_messages`` (options become ``"A. text"`` lines,
  the gold text becomes its letter) and ``cal_metrics`` (``extract(response, "answer")`` first);
- ``utils/VQA_RAD/VQA_RAD.py`` and ``utils/PATH_VQA/PATH_VQA.py``: ``cal_metrics`` (``\\boxed{}`` or
  ``<answer>`` extraction, lower-case, strip; yes/no gold -> ``judge_judgement``, else
  ``judge_open_end_vqa`` whose ``em`` is the correctness; optional LLM judge for open questions);
- ``utils/SLAKE/SLAKE.py``: ``cal_metrics`` (CLOSED answers that are not yes/no ->
  ``judge_close_end_vqa``);
- ``\\boxed{}`` content as hiyouga/MathRuler@14dadeb0e962ff707aba889c85979155d25245ce
  ``mathruler/grader.py:extract_boxed_content`` finds it (last ``\\boxed{``, braces balanced,
  the string ``"None"`` when there is none).

The rules as the code has them, quirks included (each is pinned by a case in
tests/data/scoring_cases/medevalkit*.jsonl):

- multiple choice: the reply is lower-cased; a first (or last, before a ".") paragraph that is a
  bare letter is taken; ``parse_response`` keeps what follows the last of "answer is", "answer:",
  "**answer**" ... (so "Answer: C" -> " c"), or the ``\\boxed{}`` / ``<answer>`` content; then the
  text before the first "." and after the last ":" must equal the gold letter, or be a letter
  whose option is the gold, else the option most similar to the whole reply (difflib ratio) wins
  — with option A as the fallback when nothing is similar at all, so an empty reply scores
  "correct" whenever the gold is A. A reply that merely contains the word "boxed" is parsed as
  the string "None".
- yes/no: correct when exactly one of the substrings "yes" / "no" occurs in the parsed reply and
  the gold does ("Yes, no abnormality is seen" is wrong for gold yes; "normal", "not", "know",
  "none" all contain "no"; "eyes" contains "yes").
- open: exact string equality of the parsed reply and the lower-cased gold — no punctuation
  stripping ("Left lung." is wrong) and the text after "answer is" keeps its leading space
  ("The answer is left lung" is wrong). Extras: MedEvalKit's set-based token precision / recall /
  F1, under their right names (the released ``judge_open_end_vqa`` unpacks ``calculate_f1``'s
  ``(f1, precision, recall)`` as ``(precision, recall, f1)``, so its report's "precision" column
  is F1, "recall" is precision and "f1" is recall; and it raises on an empty reply or gold,
  where ``calculate_f1`` returns a bare 0). This module reports 0.0 there instead of raising.
- closed short answer (SLAKE's CLOSED non-yes/no): parsed reply with "." and newlines removed
  equals the lower-cased gold.

Option sets: OmniMedVQA's loader reads option_A..option_D; medlvr records can carry up to 26
options, and every option is lettered here, as MedEvalKit's other multiple-choice benchmarks do
(MedXpertQA ``construct_messages``). The gold letter is that of the (last) option equal to the
gold text, as OmniMedVQA's loop leaves it; with no exactly equal option the gold stays the text,
as there.

BLEU / ROUGE (nltk, rouge) are not computed: they never decide correctness.
"""
from __future__ import annotations

import difflib

from medlvr.data.scoring._base import Fields, Judge, LETTERS, Score, YES_NO, call_judge, takes_record

SOURCE = "alibaba-damo-academy/MedEvalKit@9b12e3b34232a8779cc1275417bf4f72f03d28e0"

# parse_response's markers, in its order: each one found cuts the text to what follows its last occurrence.
_ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:",
                   "答案:", "final answer", "final answer is")
_NO_BOX = "None"  # what MathRuler's extract_boxed_content returns when there is no \boxed{...}


def boxed_content(text: str) -> str:
    """Content of the last ``\\boxed{...}`` (braces balanced), stripped; the string "None" if none."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return _NO_BOX
    body = text[start + len("\\boxed{"):]
    depth = 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return body[:i].strip()
    return _NO_BOX


def tagged(text: str, tag: str) -> str:
    """MedEvalKit's ``extract(text, tag)``: every complete ``<tag>...</tag>`` span joined by spaces
    and stripped; the whole text when there is none or all are blank; "" for an empty text.
    Tags are matched case-sensitively."""
    if not text:
        return ""
    opening, closing = f"<{tag}>", f"</{tag}>"
    parts = []
    i = text.find(opening)
    while i != -1:
        j = text.find(closing, i + len(opening))
        if j == -1:
            break
        parts.append(text[i + len(opening):j])
        i = text.find(opening, j + len(closing))
    inner = " ".join(parts).strip()
    return inner if inner else text


def parse_response(response: str) -> str:
    """Lower-case; take the ``\\boxed{}`` content when "boxed" occurs (else the ``<answer>`` content);
    then cut after each answer marker found."""
    r = response.lower()
    if "boxed" in r:
        r = boxed_content(r)
    elif "<answer>" in r:
        r = tagged(r, "answer")
    for marker in _ANSWER_MARKERS:
        if marker in r:
            r = r.split(marker)[-1]
    return r


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _most_similar(candidates, target: str) -> int:
    """First candidate with the highest difflib ratio to `target`; 0 when all ratios are 0."""
    best, best_i = 0.0, 0
    for i, c in enumerate(candidates):
        r = _ratio(c, target)
        if r > best:
            best, best_i = r, i
    return best_i


def judge_multi_choice(choices: list[str], answer: str, response: str) -> bool:
    """MedEvalKit's multiple-choice rule. `choices` are the option lines ("A. text"), `answer` the
    gold letter (or text), `response` the reply after ``tagged(reply, "answer")``."""
    r = response.lower()
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    paragraphs = r.split("\n\n")
    if paragraphs[0] in letters:
        r = paragraphs[0]
    elif paragraphs[-1].split(".")[0] in letters:
        r = paragraphs[-1].split(".")[0]
    r = parse_response(r)
    lowered = [c.lower() for c in choices]
    r = r.strip().lower().replace("\n", "")
    head = r.split(".")[0].split(":")[-1]
    gold = answer.strip().lower()
    if head == gold:
        return True
    if head in letters:
        return lowered[ord(head) - ord("a")] == gold
    if head in lowered:
        return gold in letters and head == lowered[ord(gold) - ord("a")]
    i = _most_similar(lowered, r)
    return letters[i] == gold or lowered[i] == gold


def judge_judgement(answer: str, response: str) -> bool:
    """Yes/no: exactly one of "yes" / "no" occurs (as substrings) in the parsed reply, and the gold does."""
    gold = answer.lower()
    r = parse_response(response).replace("\n", "").replace(".", "")
    if ("yes" in r) != ("no" in r):
        return gold in r
    return False


def judge_close_end_vqa(answer: str, response: str) -> bool:
    """Closed short answer: the parsed reply without "." and newlines equals the lower-cased gold."""
    r = parse_response(response).replace("\n", "").replace(".", "")
    return r == answer.lower()


def token_prf(prediction: str, gold: str) -> dict:
    """MedEvalKit's ``calculate_f1``: precision, recall, F1 of the SETS of lower-cased
    whitespace tokens; 0.0 each when either side has no token (where the toolkit raises)."""
    p, g = set(prediction.lower().split()), set(gold.lower().split())
    if not p or not g:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    common = len(p & g)
    precision, recall = common / len(p), common / len(g)
    if precision + recall == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def _extracted(prediction: str) -> str:
    """The reply the closed / close-end rules read: \\boxed{} content (unless it is absent or
    literally "None"), else <answer> content, else the reply itself."""
    boxed = boxed_content(prediction)
    if boxed != _NO_BOX:
        return boxed
    return tagged(prediction, "answer") if "<answer>" in prediction else prediction


def _vqa_rad_prepare(prediction: str, answer: str) -> tuple[str, str]:
    """VQA_RAD / PATH_VQA ``cal_metrics``: the extracted reply; then both sides lower-cased and
    stripped."""
    return _extracted(prediction).lower().strip(), answer.lower().strip()


def _gold_label(f: Fields) -> str:
    """OmniMedVQA ``construct_messages``: the letter of the (last) option equal to the gold text;
    the text itself when no option equals it exactly."""
    label = f.answer
    for letter, option in zip(LETTERS, f.options):
        if option == f.answer:
            label = letter
    return label


@takes_record
def score_mc(prediction: str, f: Fields) -> Score:
    choices = [f"{letter}. {o}" for letter, o in zip(LETTERS, f.options)]
    label = _gold_label(f)
    correct = judge_multi_choice(choices, label, tagged(prediction, "answer"))
    return Score(correct=correct, extras={"gold_label": label})


@takes_record
def score_closed(prediction: str, f: Fields) -> Score:
    r, gold = _vqa_rad_prepare(prediction, f.answer)
    return Score(correct=judge_judgement(gold, r))


@takes_record
def score_close_end(prediction: str, f: Fields) -> Score:
    # SLAKE cal_metrics: the same extraction, without lower-casing or stripping either side first.
    return Score(correct=judge_close_end_vqa(f.answer, _extracted(prediction)))


@takes_record
def score_open(prediction: str, f: Fields, judge: Judge | None = None) -> Score:
    r, gold = _vqa_rad_prepare(prediction, f.answer)
    parsed = parse_response(r)
    em = parsed == gold
    extras = {"em": float(em), **token_prf(parsed, gold)}
    if judge is not None:
        # VQA_RAD cal_metrics with use_llm_judge: the judge sees the prepared reply (not parsed).
        verdict = call_judge(judge, f.question, r, gold)
        return Score(correct=verdict, extras={**extras, "judge": float(verdict)})
    return Score(correct=em, extras=extras)


@takes_record
def score(prediction: str, f: Fields, judge: Judge | None = None) -> Score:
    """Options -> multiple choice (OmniMedVQA path); yes/no gold -> judgement; else open EM
    (VQA-RAD / PathVQA path), the judge (when given) deciding open records."""
    if f.options:
        return score_mc(prediction, f)
    if f.kind == YES_NO:
        return score_closed(prediction, f)
    return score_open(prediction, f, judge)


def judge_messages(question: str, prediction: str, answer: str) -> list[dict]:
    """The chat messages MedEvalKit sends its judge (``get_compare_messages``)."""
    from medlvr.data.scoring.prompts import medevalkit_judge_prompt

    return [{"role": "user", "content": medevalkit_judge_prompt(question, prediction, answer)}]


def judge_verdict(reply: str) -> bool:
    """MedEvalKit's reading of a judge reply: the ``<judge>`` content (the whole reply when there is
    no tag) must be "0" (0 = correct, 1 = incorrect in its prompt)."""
    if not isinstance(reply, str):
        raise TypeError(f"reply: expected a str, got {type(reply).__name__}")
    return tagged(reply, "judge") == "0"


__all__ = ["score", "score_mc", "score_closed", "score_close_end", "score_open", "judge_multi_choice",
           "judge_judgement", "judge_close_end_vqa", "parse_response", "boxed_content", "tagged", "token_prf",
           "judge_messages", "judge_verdict", "SOURCE"]
