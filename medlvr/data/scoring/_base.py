"""What every scoring protocol shares: the result type, the judge hook, input checks, record kinds."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Protocol as _TypingProtocol, runtime_checkable

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: The three kinds of record a protocol may score (see `record_kind`).
CHOICE, YES_NO, OPEN = "choice", "yes_no", "open"
KINDS = (CHOICE, YES_NO, OPEN)


@dataclass(frozen=True)
class Score:
    """One record's result under one protocol.

    - correct: the record counts as answered correctly.
    - counted: the record belongs in the accuracy's denominator. Only a protocol that
      reproduces a toolkit leaving records out (``llava_med_closed_as_released``) sets it False.
    - value: the record's contribution to the protocol's headline mean: 1.0 / 0.0 for the
      right/wrong protocols, LLaVA-Med's token recall for ``llava_med_open``, SQuAD F1 for
      ``squad``. Defaults to ``float(correct)``.
    - extras: further per-record numbers a toolkit reports (F1, precision, the option chosen...).
    """

    correct: bool
    counted: bool = True
    value: float | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "correct", bool(self.correct))
        object.__setattr__(self, "counted", bool(self.counted))
        object.__setattr__(self, "value", float(self.correct) if self.value is None else float(self.value))
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))


@runtime_checkable
class Judge(_TypingProtocol):
    """An LLM judge the caller supplies: ``judge(question, prediction, answer) -> bool``.

    The package never calls a network service itself. A protocol that has a judge step (MedEvalKit's
    ``use_llm_judge``: ``medevalkit``, ``medevalkit_open``) calls the judge with the question, the
    prediction as the toolkit hands it to its judge (after its answer extraction) and the gold
    answer, and takes the returned bool as the record's correctness. Build one around any client,
    e.g. with MedEvalKit's own prompt and verdict format::

        from medlvr.data.scoring import medevalkit
        def judge(question, prediction, answer):
            reply = my_llm(medevalkit.judge_messages(question, prediction, answer))   # your client
            return medevalkit.judge_verdict(reply)
    """

    def __call__(self, question: str, prediction: str, answer: str) -> bool: ...


@dataclass(frozen=True)
class Fields:
    """The parts of a record the protocols read, checked."""

    question: str
    options: tuple[str, ...] | None
    answer: str
    qtype: str
    source: str

    @property
    def kind(self) -> str:
        return record_kind(self)


def _get(record, name, default=None):
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def fields_of(record) -> Fields:
    """Read and check question / options / answer / qtype / source of a `medlvr.data.records.Record`
    (or any object with those attributes, or a mapping with those keys)."""
    if record is None:
        raise TypeError("record: expected a Record (or a mapping with 'answer' and 'options'), got None")
    if not isinstance(record, Mapping) and not hasattr(record, "answer"):
        raise TypeError(f"record: expected a Record (or a mapping with 'answer' and 'options'), got "
                        f"{type(record).__name__}")
    answer = _get(record, "answer")
    if not isinstance(answer, str):
        raise TypeError(f"record.answer: expected a str, got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError("record.answer: empty")
    options = _get(record, "options")
    if options is not None:
        if isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
            raise TypeError(f"record.options: expected None or a list of str, got {type(options).__name__}")
        options = tuple(options)
        if not all(isinstance(o, str) for o in options):
            raise TypeError(f"record.options: expected None or a list of str, got {list(options)!r}")
        if len(options) < 2:
            raise ValueError(f"record.options: expected at least 2 options, got {list(options)!r}")
        if len(options) > len(LETTERS):
            raise ValueError(f"record.options: expected at most {len(LETTERS)} options, got {len(options)}")
    question = _get(record, "question", "") or ""
    if not isinstance(question, str):
        raise TypeError(f"record.question: expected a str, got {type(question).__name__}")
    qtype = _get(record, "qtype", "") or ""
    source = _get(record, "source", "") or ""
    return Fields(question=question, options=options, answer=answer, qtype=str(qtype), source=str(source))


def record_kind(record) -> str:
    """'choice' (the record has options), 'yes_no' (no options, gold answer yes or no, any case and
    surrounding spaces), or 'open' (anything else). Takes a record or its `Fields`."""
    f = record if isinstance(record, Fields) else fields_of(record)
    if f.options:
        return CHOICE
    if f.answer.strip().lower() in ("yes", "no"):
        return YES_NO
    return OPEN


def check_prediction(prediction) -> str:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction: expected a str, got {type(prediction).__name__}")
    return prediction


def answer_index(f: Fields) -> int:
    """Index of the gold answer among the options: the first option equal to it, else the first
    equal after medlvr's `normalize_answer` (which `load_jsonl` validated)."""
    from medlvr.data.answers import normalize_answer

    assert f.options is not None
    if f.answer in f.options:
        return f.options.index(f.answer)
    norm = normalize_answer(f.answer)
    for i, o in enumerate(f.options):
        if normalize_answer(o) == norm:
            return i
    raise ValueError(f"record.answer: {f.answer!r} is not one of the options {list(f.options)!r}")


ScoreFn = Callable[..., Score]


def takes_record(fn: ScoreFn) -> ScoreFn:
    """Let a module-level rule ``fn(prediction, fields[, judge])`` be called with a record too
    (checked as the registry checks it; the record kind is the caller's business here)."""
    import functools

    @functools.wraps(fn)
    def wrapper(prediction, record, *args, **kwargs):
        if not isinstance(record, Fields):
            prediction, record = check_prediction(prediction), fields_of(record)
        return fn(prediction, record, *args, **kwargs)

    return wrapper


# The names of the protocols made with a judge step, in the order they are made (for errors).
WITH_JUDGE: list[str] = []


@dataclass(frozen=True)
class ScoringProtocol:
    """A named scoring rule.

    - name: registry key (``--protocol`` value).
    - fn: ``fn(prediction, fields)`` or, with ``accepts_judge``, ``fn(prediction, fields, judge)``.
    - kinds: the record kinds it scores (`KINDS`); another kind raises ValueError.
    - source: ``repo@commit:file:function`` of the code it was written from.
    - summary: one line on the rule.
    - known_bug: None, or one sentence naming the toolkit bug this protocol reproduces on purpose.
    """

    name: str
    fn: ScoreFn
    kinds: frozenset
    source: str
    summary: str
    known_bug: str | None = None
    accepts_judge: bool = False

    def __post_init__(self):
        if self.accepts_judge:
            WITH_JUDGE.append(self.name)

    def __call__(self, prediction: str, record, *, judge: Judge | None = None) -> Score:
        prediction = check_prediction(prediction)
        f = fields_of(record)
        kind = record_kind(f)
        if kind not in self.kinds:
            what = {CHOICE: "multiple-choice records (with options)", YES_NO: "yes/no records (no options)",
                    OPEN: "open records (no options, answer not yes/no)"}
            wanted = ", ".join(what[k] for k in KINDS if k in self.kinds)
            field_name = "record.options" if (kind == CHOICE or CHOICE in self.kinds) else "record.answer"
            raise ValueError(f"{field_name}: protocol {self.name!r} scores {wanted} only; this record is "
                             f"{what[kind]} (answer {f.answer!r})")
        if judge is not None:
            if not self.accepts_judge:
                raise ValueError(f"judge: protocol {self.name!r} has no LLM-judge step; protocols with one: "
                                 f"{', '.join(WITH_JUDGE)}")
            if not callable(judge):
                raise TypeError(f"judge: expected a callable judge(question, prediction, answer) -> bool, got "
                                f"{type(judge).__name__}")
            return self.fn(prediction, f, judge)
        return self.fn(prediction, f, None) if self.accepts_judge else self.fn(prediction, f)


def call_judge(judge: Judge, question: str, prediction: str, answer: str) -> bool:
    verdict = judge(question, prediction, answer)
    if not isinstance(verdict, bool):
        raise TypeError(f"judge: expected judge(question, prediction, answer) to return a bool, got "
                        f"{type(verdict).__name__} ({verdict!r})")
    return verdict


def accuracy(scores: Iterable[Score]) -> float:
    """Fraction correct among the counted records (the toolkits' accuracy)."""
    scores = list(scores)
    counted = [s for s in scores if s.counted]
    if not counted:
        raise ValueError(f"scores: no counted records among {len(scores)}")
    return sum(s.correct for s in counted) / len(counted)


def mean_value(scores: Iterable[Score]) -> float:
    """Mean `Score.value` over the counted records: equal to `accuracy` for right/wrong
    protocols, the mean recall for ``llava_med_open``, the mean F1 for ``squad``."""
    scores = list(scores)
    counted = [s for s in scores if s.counted]
    if not counted:
        raise ValueError(f"scores: no counted records among {len(scores)}")
    total = math.fsum(s.value for s in counted)
    return total / len(counted)
