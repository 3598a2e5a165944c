"""Scoring protocols (medlvr.data.scoring) against the toolkits' own results.

Every table in tests/data/scoring_cases/<protocol>.jsonl holds (prediction, gold, options) cases
and the result the toolkit's OWN function gave for each (run once outside the package; the
header line names repo, commit, file and function). Each protocol must agree on every case.
"""
import json
import math
from pathlib import Path

import pytest

from medlvr.data.records import Record
from medlvr.data.scoring import (DEFAULT_PROTOCOL, PROMPTS, PROTOCOLS, Score, accuracy, format_prompt,
                                 mean_value, protocol, record_kind, score_all, score_with)
from medlvr.data.scoring import medevalkit

CASES = Path(__file__).parent / "scoring_cases"


def _table(name):
    lines = (CASES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["header"]
    return header, [json.loads(line) for line in lines[1:] if line.strip()]


def _record(case):
    return Record(id=case["id"], images=["x.png"], question=case["question"], options=case["options"],
                  answer=case["answer"], qtype=case.get("qtype", ""))


def _all_cases():
    out = []
    for name in PROTOCOLS:
        _, rows = _table(name)
        out += [pytest.param(name, r, id=f"{name}-{r['id']}") for r in rows]
    return out


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_protocol_has_a_cited_table_of_at_least_50_cases(name):
    header, rows = _table(name)
    assert header["protocol"] == name
    for key in ("toolkit", "commit", "file", "function", "generated"):
        assert header.get(key), (name, key)
    assert len(header["commit"]) == 40
    assert len(rows) >= 50, (name, len(rows))
    assert len({r["id"] for r in rows}) == len(rows)
    # the protocol cites the same commit as its table
    assert header["commit"] in PROTOCOLS[name].source or header["commit"][:7] in PROTOCOLS[name].source


@pytest.mark.parametrize("name,case", _all_cases())
def test_protocol_agrees_with_its_toolkit(name, case):
    s = score_with(name, case["prediction"], _record(case))
    exp = case["expected"]
    assert s.correct is exp["correct"], (case["prediction"], case["answer"], case.get("note"))
    assert s.counted is exp.get("counted", True)
    if "value" in exp:
        assert math.isclose(s.value, exp["value"], rel_tol=1e-12, abs_tol=1e-12)
    else:
        assert s.value == float(s.correct)
    for k, v in exp.get("extras", {}).items():
        assert math.isclose(s.extras[k], v, rel_tol=1e-12, abs_tol=1e-12), k
    released = case.get("released_metrics")
    if released is not None:
        # MedEvalKit's judge_open_end_vqa stores calculate_f1's (f1, precision, recall) under
        # ("precision", "recall", "f1"); the protocol reports them under their right names.
        assert s.extras["em"] == float(released["em"])
        assert math.isclose(s.extras["f1"], released["precision"], abs_tol=1e-12)
        assert math.isclose(s.extras["precision"], released["recall"], abs_tol=1e-12)
        assert math.isclose(s.extras["recall"], released["f1"], abs_tol=1e-12)


def test_the_issue_cases():
    tb = ["Pulmonary edema", "Pneumothorax", "manifestation of TB", "Normal"]
    mri = ["CT", "MRI", "X-ray", "Ultrasound"]
    yes = {"question": "Is there a lesion?", "options": None, "answer": "Yes"}
    c = {"question": "q", "options": tb, "answer": "manifestation of TB"}
    b = {"question": "q", "options": mri, "answer": "MRI"}
    two = {"question": "How many?", "options": None, "answer": "2"}
    ok = lambda name, pred, rec: score_with(name, pred, rec).correct  # noqa: E731
    assert not ok("medlvr", "The answer is yes", yes)
    assert ok("medevalkit", "The answer is yes", yes) and ok("llava_med", "The answer is yes", yes)
    assert ok("medlvr", "Yes, no abnormality is seen", yes)
    assert not ok("medevalkit", "Yes, no abnormality is seen", yes)
    assert not ok("medlvr", "Answer: C", c) and ok("medevalkit", "Answer: C", c)
    assert ok("medlvr", "C) manifestation of TB", c)   # measured: medlvr's rule already takes "C) <option text>"
    assert ok("medevalkit", "C) manifestation of TB", c) and ok("omnimedvqa", "C) manifestation of TB", c)
    assert not ok("omnimedvqa", "Answer: C", c)   # measured: the official scorer gets this one wrong too
    assert ok("medlvr", "B", b) and not ok("omnimedvqa", "B", b)
    assert not ok("medlvr", "two", two) and ok("llava_med", "two", two)
    assert score_with("llava_med_open", "two", two).value == 1.0
    for pred in ("present", "positive"):
        assert ok("medlvr", pred, yes) and not ok("medevalkit", pred, yes)
    assert ok("medlvr", "n", {**yes, "answer": "no"}) and not ok("medevalkit", "n", {**yes, "answer": "no"})


def test_registry_default_and_known_bug_naming():
    assert DEFAULT_PROTOCOL == "medevalkit"
    assert protocol() is PROTOCOLS["medevalkit"] is protocol(None)
    for name, p in PROTOCOLS.items():
        assert p.name == name and p.summary and "@" in p.source
        if p.known_bug is not None:
            assert "as_released" in name or "bug" in name
            assert p.known_bug.endswith(".") and p.known_bug.count(". ") == 0
    assert PROTOCOLS["llava_med_closed_as_released"].known_bug
    assert [n for n, p in PROTOCOLS.items() if p.known_bug] == ["llava_med_closed_as_released"]


def test_unknown_protocol_names_the_argument_and_lists_known():
    with pytest.raises(ValueError, match=r"^name: unknown scoring protocol 'omnimed'; known: medevalkit, ") as e:
        protocol("omnimed")
    for name in PROTOCOLS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="^name: unknown scoring protocol"):
        score_with("nope", "yes", {"answer": "yes", "options": None})
    with pytest.raises(TypeError, match="^name: expected a scoring protocol name"):
        protocol(3)


def test_bad_inputs_name_the_argument():
    rec = {"question": "Is there a lesion?", "options": None, "answer": "yes"}
    with pytest.raises(TypeError, match="^prediction: expected a str, got NoneType"):
        score_with("medevalkit", None, rec)
    with pytest.raises(TypeError, match="^record: expected a Record"):
        score_with("medevalkit", "yes", None)
    with pytest.raises(TypeError, match="^record: expected a Record"):
        score_with("medevalkit", "yes", 42)
    with pytest.raises(TypeError, match="^record.answer: expected a str"):
        score_with("medevalkit", "yes", {"options": None})
    with pytest.raises(ValueError, match="^record.answer: empty"):
        score_with("medevalkit", "yes", {"answer": "  ", "options": None})
    with pytest.raises(TypeError, match="^record.options: expected None or a list of str"):
        score_with("medevalkit", "yes", {"answer": "yes", "options": "yes/no"})
    with pytest.raises(ValueError, match="^record.options: expected at least 2 options"):
        score_with("medevalkit", "yes", {"answer": "yes", "options": ["yes"]})
    # a protocol given a kind of record it does not score
    with pytest.raises(ValueError, match="^record.options: protocol 'omnimedvqa' scores multiple-choice"):
        score_with("omnimedvqa", "yes", rec)
    with pytest.raises(ValueError, match="^record.options: protocol 'llava_med' scores yes/no"):
        score_with("llava_med", "A", {"answer": "CT", "options": ["CT", "MRI"]})
    with pytest.raises(ValueError, match="^record.answer: protocol 'medevalkit_closed' scores yes/no"):
        score_with("medevalkit_closed", "left", {"answer": "left lung", "options": None})
    with pytest.raises(ValueError, match="^record.answer: 'PET' is not one of the options"):
        score_with("med_r1", "<answer>A</answer>", {"answer": "PET", "options": ["CT", "MRI"]})
    with pytest.raises(ValueError, match="^predictions: expected one per record"):
        score_all("medevalkit", ["yes"], [rec, rec])


def test_records_and_mappings_score_alike():
    rec = Record(id="a", images=["x.png"], question="Which?", options=["CT", "MRI"], answer="MRI")
    as_dict = {"question": "Which?", "options": ["CT", "MRI"], "answer": "MRI"}
    for name, p in PROTOCOLS.items():
        if "choice" in p.kinds:
            assert score_with(name, "<answer>B</answer>", rec) == score_with(name, "<answer>B</answer>", as_dict)
    # the modules' own rules take a record too
    assert medevalkit.score("Answer: B", rec).correct and medevalkit.score_mc("B", as_dict).correct
    with pytest.raises(TypeError, match="^prediction: expected a str"):
        medevalkit.score_mc(None, rec)
    assert record_kind(rec) == "choice"
    assert record_kind({"answer": " No ", "options": None}) == "yes_no"
    assert record_kind({"answer": "left", "options": None}) == "open"


def test_judge_hook_decides_open_records_only():
    calls = []

    def judge(question, prediction, answer):
        calls.append((question, prediction, answer))
        return True

    rec = {"question": "Which organ?", "options": None, "answer": "Heart"}
    s = score_with("medevalkit", "<answer>The Heart.</answer>", rec, judge=judge)
    assert s.correct and s.extras["em"] == 0.0 and s.extras["judge"] == 1.0
    # VQA_RAD cal_metrics hands its judge the extracted, lower-cased, stripped reply and gold
    assert calls == [("Which organ?", "the heart.", "heart")]
    assert not score_with("medevalkit", "The Heart.", rec).correct   # no judge: exact match
    score_with("medevalkit", "yes", {"question": "q", "options": None, "answer": "yes"}, judge=judge)
    score_with("medevalkit", "A", {"question": "q", "options": ["CT", "MRI"], "answer": "CT"}, judge=judge)
    assert len(calls) == 1          # yes/no and multiple choice never reach the judge
    assert score_with("medevalkit_open", "lung", rec, judge=lambda q, p, a: False).correct is False
    with pytest.raises(ValueError, match="^judge: protocol 'omnimedvqa' has no LLM-judge step; protocols with one: "
                                         "medevalkit, medevalkit_open"):
        score_with("omnimedvqa", "A", {"options": ["CT", "MRI"], "answer": "CT"}, judge=judge)
    with pytest.raises(TypeError, match="^judge: expected a callable"):
        score_with("medevalkit", "x", rec, judge="gpt-4")
    with pytest.raises(TypeError, match="^judge: expected judge.* to return a bool, got str"):
        score_with("medevalkit", "x", rec, judge=lambda q, p, a: "0")


def test_judge_prompt_and_verdict_match_medevalkit():
    header = json.loads((CASES / "prompts.jsonl").read_text(encoding="utf-8").splitlines()[0])["header"]
    j = header["judge"]
    assert medevalkit.judge_messages(j["question"], j["prediction"], j["answer"]) == j["expected_messages"]
    assert medevalkit.judge_verdict("<think>same organ</think>\n<judge>0</judge>") is True
    assert medevalkit.judge_verdict("<think>no</think><judge>1</judge>") is False
    assert medevalkit.judge_verdict("0") is True           # no tag: the whole reply is read
    assert medevalkit.judge_verdict("") is False
    with pytest.raises(TypeError, match="^reply: expected a str"):
        medevalkit.judge_verdict(None)


def _prompt_cases():
    lines = (CASES / "prompts.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for line in lines:
        r = json.loads(line)
        out += [pytest.param(r, name, text, id=f"{r['id']}-{name}") for name, text in r["expected"].items()]
    return out


@pytest.mark.parametrize("rec,name,text", _prompt_cases())
def test_prompt_templates_match_the_toolkits(rec, name, text):
    assert format_prompt(name, rec) == text


def test_every_prompt_template_is_pinned_and_bad_names_are_named():
    pinned = {name for p in _prompt_cases() for name in [p.values[1]]}
    assert pinned == set(PROMPTS)
    with pytest.raises(ValueError, match=r"^name: unknown prompt template 'mc'; known: medevalkit, "):
        format_prompt("mc", {"question": "q", "options": None, "answer": "yes"})
    with pytest.raises(ValueError, match="^record.options: prompt template 'omnimedvqa' needs a record with options"):
        format_prompt("omnimedvqa", {"question": "q", "options": None, "answer": "yes"})
    with pytest.raises(ValueError, match="^record.options: prompt template 'llava_med' needs a record with no options"):
        format_prompt("llava_med", {"question": "q", "options": ["a", "b"], "answer": "a"})
    with pytest.raises(ValueError, match="^record.question: empty"):
        format_prompt("medevalkit", {"question": " ", "options": None, "answer": "yes"})


def test_accuracy_counts_only_counted_records():
    _, rows = _table("llava_med_closed_as_released")
    scores = score_all("llava_med_closed_as_released", [r["prediction"] for r in rows], [_record(r) for r in rows])
    fixed = score_all("llava_med_closed", [r["prediction"] for r in rows], [_record(r) for r in rows])
    n_counted = sum(s.counted for s in scores)
    assert n_counted < len(rows)
    assert accuracy(scores) == sum(s.correct for s in scores) / n_counted
    assert accuracy(scores) > accuracy(fixed)     # the released bug inflates closed accuracy
    assert mean_value([Score(True), Score(False, value=0.5), Score(False, counted=False)]) == 0.75
    with pytest.raises(ValueError, match="^scores: no counted records"):
        accuracy([Score(False, counted=False)])
    with pytest.raises(ValueError, match="^scores: no counted records"):
        mean_value([])
