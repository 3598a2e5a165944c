"""Question prompts, answer normalisation and scoring shared by training, evaluation and VLPO rewards."""
from __future__ import annotations

import re
import string

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_YES = {"yes", "y", "true", "present", "positive"}
_NO = {"no", "n", "false", "absent", "negative"}


def format_question(question: str, options: list[str] | None = None) -> str:
    """User-turn text after the image(s): the question, then lettered options when given.

    The target answer stays the option TEXT (what `Record.answer` holds); `score` accepts the
    letter too, so a model that answers "B" is not penalised.
    """
    q = question.strip()
    if not options:
        return q
    lines = [q, "Options:"]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    lines.append("Answer with the option's text.")
    return "\n".join(lines)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace ("The Left lung." -> "left lung")."""
    t = _PUNCT.sub(" ", str(text).lower())
    words = [w for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def is_yes_no(answer: str) -> bool:
    return normalize_answer(answer) in ("yes", "no")


def _yes_no(text: str) -> str | None:
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    return None


def option_from_prediction(pred: str, options: list[str]) -> str | None:
    """The option a prediction names: its text (normalised) or its letter ("B", "B.", "(b)", "b) x")."""
    norm_opts = [normalize_answer(o) for o in options]
    p = normalize_answer(pred)
    if p in norm_opts:
        return options[norm_opts.index(p)]
    raw = pred.strip()
    m = re.match(r"^\(?([A-Za-z])\)?(?:[.):]|\s|$)", raw)
    if m:
        idx = LETTERS.index(m.group(1).upper())
        # "a" alone is ambiguous with the article but normalise() already removed articles, so a
        # bare letter reaches here only as a letter. "B. lower left" also resolves to option B.
        if idx < len(options):
            rest = normalize_answer(raw[m.end():])
            if not rest or rest == norm_opts[idx]:
                return options[idx]
    return None


def score(pred: str, record) -> bool:
    """True when `pred` answers `record` correctly.

    - multiple choice (record.options): the option named by text or letter equals the answer;
    - yes/no answers: the first word of the prediction maps to the same polarity;
    - otherwise exact match after `normalize_answer`.
    """
    if pred is None:
        return False
    answer = record.answer
    if record.options:
        chosen = option_from_prediction(pred, record.options)
        return chosen is not None and normalize_answer(chosen) == normalize_answer(answer)
    if is_yes_no(answer):
        return _yes_no(pred) == normalize_answer(answer)
    return normalize_answer(pred) == normalize_answer(answer) and normalize_answer(answer) != ""
