"""Question prompts per toolkit, as each one's own code phrases them (named templates).

``format_prompt(name, record)`` returns the user-turn text (image tokens are the model's
business: medlvr's collate adds them). The exact strings are pinned by
tests/data/scoring_cases/prompts.jsonl, produced by the toolkits' own functions.

Sources:

- ``medevalkit_*``: alibaba-damo-academy/MedEvalKit@9b12e3b34232a8779cc1275417bf4f72f03d28e0,
  ``utils/question_formats.py``: ``get_multiple_choice_prompt`` (options as ``"A. text"`` lines, as
  ``utils/OmniMedVQA/OmniMedVQA.py:construct_messages`` builds them), ``get_judgement_prompt``,
  ``get_close_ended_prompt``, ``get_open_ended_prompt``; ``*_reasoning`` is their
  ``is_reasoning=True`` (REASONING=True) form asking for ``\\boxed{}``. ``medevalkit`` picks as the
  benchmarks do: options -> multiple choice (OmniMedVQA), yes/no gold -> judgement, else open
  ended (VQA_RAD / PATH_VQA ``construct_messages``; SLAKE uses close-ended for its CLOSED type).
  The judge prompt is ``utils/utils.py:get_compare_messages`` (`medevalkit_judge_prompt`).
- ``omnimedvqa``: OpenGVLab/Multi-Modality-Arena@bd2999a3be2bf4539a7e071cf2cfab5822f66417,
  ``MedicalEval/Question-answering_Score/task_datasets/medical_datasets.py:MedicalDataset.__getitem__``
  (no space after the question; the options as a Python list repr; A-D only).
- ``med_r1``, ``med_r1_nothink``, ``med_r1_train``: Yuxiang-Lai117/Med-R1@88d76c73e7d21cd958a2b2dc32eca038be766f8f,
  ``QUESTION_TEMPLATE`` of ``src/eval_vqa/test_qwen2_5vl_vqa.py``, ``test_qwen2_5vl_vqa_nothink.py``
  and ``src/r1-v/src/open_r1/grpo_vqa.py``; the question with its options laid out as the
  repository's ``Splits/*.json`` "problem" strings ("<question> A)<text>, B)<text>").
- ``medvlthinker``: UCSC-VLAA/MedVLThinker@a3163b1663b21cb300e93850c397917c3a4be612,
  ``eval/run_offline_inference_v2.py:build_messages`` with its ``INSTRUCTION_PROMPT`` (a raw
  string: its "\\n" reaches the model as a backslash and an "n", reproduced).
- ``llava_med``: microsoft/LLaVA-Med@b9a98a736d2ef05bcf5ff345be6403fb3a664eaf,
  ``llava/eval/model_vqa_med.py``: the question as the test file has it, ``<image>`` removed, stripped.
- ``medlvr``: `medlvr.data.answers.format_question` (options as "A. text" lines, "Answer with the
  option's text.").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from medlvr.data.scoring._base import CHOICE, KINDS, LETTERS, OPEN, YES_NO, Fields, fields_of, record_kind

_MC_DIRECT = "Answer with the option's letter from the given choices directly."
_MC_BOXED = 'Answer with the option\'s letter from the given choices and put the letter in one "\\boxed{}".'
_JUDGEMENT = "Please output 'yes' or 'no'(no extra output)."
_JUDGEMENT_BOXED = 'Please output "yes" or "no" and put the answer in one "\\boxed{}".'
_CLOSE = "Answer the question using a single word or phrase."
_CLOSE_BOXED = 'Answer the question using a single word or phrase and put the answer in one "\\boxed{}".'
_OPEN = "Please answer the question concisely."
_OPEN_BOXED = 'Please answer the question concisely and put the answer in one "\\boxed{}".'

_OMNI_TAIL = (" Only return what you think is the correct answer from the candidate answers, do not return "
              "any other irrelevant text!")
_MED_R1_THINK = (" Think through the question step by step in <think>...</think> tags. Then provide the correct "
                 "single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.")
_MED_R1_NOTHINK = " Provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags."
_MED_R1_TRAIN = (" Your task: 1. Think through the question step by step, enclose your reasoning process in "
                 "<think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...) inside "
                 "<answer>...</answer> tags. 3. No extra information or text outside of these tags.")
_MEDVLTHINKER = ("You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
                 "before providing the answer.\\nWrite your final answer within <answer> </answer> tags.")

_JUDGE = """
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers (for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, so it is correct.</think>
<judge>0</judge>
    """


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    kinds: frozenset
    source: str
    summary: str
    render: Callable[[Fields], str]


def _mc(f: Fields, instruction: str) -> str:
    options = "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, f.options))
    return f"\nQuestion: {f.question}\nOptions: \n{options}" + "\n" + instruction


def _suffix(instruction: str) -> Callable[[Fields], str]:
    return lambda f: f.question + "\n" + instruction


def _medevalkit(boxed: bool) -> Callable[[Fields], str]:
    def render(f: Fields) -> str:
        kind = record_kind(f)
        if kind == CHOICE:
            return _mc(f, _MC_BOXED if boxed else _MC_DIRECT)
        if kind == YES_NO:
            return f.question + "\n" + (_JUDGEMENT_BOXED if boxed else _JUDGEMENT)
        return f.question + "\n" + (_OPEN_BOXED if boxed else _OPEN)
    return render


def _omnimedvqa(f: Fields) -> str:
    options = list(f.options[:4])
    return f.question + f"Here are {len(options)} candidate answers:" + str(options) + _OMNI_TAIL


def _med_r1_problem(f: Fields) -> str:
    return f.question + " " + ", ".join(f"{letter}){o}" for letter, o in zip(LETTERS, f.options))


def _medvlthinker(f: Fields) -> str:
    body = f"Question: {f.question}\n\nOptions:" + "".join(f"\n\n{letter}. {o}" for letter, o in zip(LETTERS, f.options))
    return _MEDVLTHINKER + "\n\n" + body


def _medlvr(f: Fields) -> str:
    from medlvr.data.answers import format_question

    return format_question(f.question, list(f.options) if f.options else None)


_ALL = frozenset(KINDS)
_MCK = frozenset({CHOICE})
_NOMC = frozenset({YES_NO, OPEN})
_QF = "alibaba-damo-academy/MedEvalKit@9b12e3b34232a8779cc1275417bf4f72f03d28e0:utils/question_formats.py:"
_R1 = "Yuxiang-Lai117/Med-R1@88d76c73e7d21cd958a2b2dc32eca038be766f8f:"

PROMPTS: dict[str, PromptTemplate] = {t.name: t for t in (
    PromptTemplate("medevalkit", _ALL, _QF + "get_*_prompt (chosen as the benchmarks' construct_messages do)",
                   "options -> letter choice; yes/no gold -> judgement; else open ended", _medevalkit(False)),
    PromptTemplate("medevalkit_reasoning", _ALL, _QF + "get_*_prompt(is_reasoning=True)",
                   "as medevalkit, asking for the answer in \\boxed{}", _medevalkit(True)),
    PromptTemplate("medevalkit_multiple_choice", _MCK, _QF + "get_multiple_choice_prompt",
                   "Question / Options / 'Answer with the option's letter ... directly.'", lambda f: _mc(f, _MC_DIRECT)),
    PromptTemplate("medevalkit_multiple_choice_reasoning", _MCK, _QF + "get_multiple_choice_prompt(is_reasoning=True)",
                   "letter in \\boxed{}", lambda f: _mc(f, _MC_BOXED)),
    PromptTemplate("medevalkit_judgement", _NOMC, _QF + "get_judgement_prompt",
                   "question + \"Please output 'yes' or 'no'(no extra output).\"", _suffix(_JUDGEMENT)),
    PromptTemplate("medevalkit_judgement_reasoning", _NOMC, _QF + "get_judgement_prompt(is_reasoning=True)",
                   "yes/no in \\boxed{}", _suffix(_JUDGEMENT_BOXED)),
    PromptTemplate("medevalkit_close_ended", _NOMC, _QF + "get_close_ended_prompt",
                   "question + 'Answer the question using a single word or phrase.'", _suffix(_CLOSE)),
    PromptTemplate("medevalkit_close_ended_reasoning", _NOMC, _QF + "get_close_ended_prompt(is_reasoning=True)",
                   "single word or phrase in \\boxed{}", _suffix(_CLOSE_BOXED)),
    PromptTemplate("medevalkit_open_ended", _NOMC, _QF + "get_open_ended_prompt",
                   "question + 'Please answer the question concisely.'", _suffix(_OPEN)),
    PromptTemplate("medevalkit_open_ended_reasoning", _NOMC, _QF + "get_open_ended_prompt(is_reasoning=True)",
                   "concise answer in \\boxed{}", _suffix(_OPEN_BOXED)),
    PromptTemplate("omnimedvqa", _MCK,
                   "OpenGVLab/Multi-Modality-Arena@bd2999a3be2bf4539a7e071cf2cfab5822f66417:MedicalEval/"
                   "Question-answering_Score/task_datasets/medical_datasets.py:MedicalDataset.__getitem__",
                   "question + 'Here are N candidate answers:[...] Only return ...'", _omnimedvqa),
    PromptTemplate("med_r1", _MCK, _R1 + "src/eval_vqa/test_qwen2_5vl_vqa.py:QUESTION_TEMPLATE",
                   "problem + think in <think>, single letter in <answer>", lambda f: _med_r1_problem(f) + _MED_R1_THINK),
    PromptTemplate("med_r1_nothink", _MCK, _R1 + "src/eval_vqa/test_qwen2_5vl_vqa_nothink.py:QUESTION_TEMPLATE",
                   "problem + single letter in <answer>", lambda f: _med_r1_problem(f) + _MED_R1_NOTHINK),
    PromptTemplate("med_r1_train", _MCK, _R1 + "src/r1-v/src/open_r1/grpo_vqa.py:QUESTION_TEMPLATE",
                   "the GRPO training prompt", lambda f: _med_r1_problem(f) + _MED_R1_TRAIN),
    PromptTemplate("medvlthinker", _MCK,
                   "UCSC-VLAA/MedVLThinker@a3163b1663b21cb300e93850c397917c3a4be612:eval/run_offline_inference_v2.py:"
                   "build_messages", "instruction, Question, Options (blank-line separated)", _medvlthinker),
    PromptTemplate("llava_med", _NOMC,
                   "microsoft/LLaVA-Med@b9a98a736d2ef05bcf5ff345be6403fb3a664eaf:llava/eval/model_vqa_med.py:eval_model",
                   "the question as is", lambda f: f.question.replace("<image>", "").strip()),
    PromptTemplate("medlvr", _ALL, "medlvr@89be64f6f3d9316ac426282cbf3d43724e156bce:medlvr/data/answers.py:format_question",
                   "question, 'Options:' + 'A. text' lines, 'Answer with the option's text.'", _medlvr),
)}


def prompt_template(name: str) -> PromptTemplate:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a prompt template name (str), got {type(name).__name__}")
    if name not in PROMPTS:
        raise ValueError(f"name: unknown prompt template {name!r}; known: {', '.join(PROMPTS)}")
    return PROMPTS[name]


def format_prompt(name: str, record) -> str:
    """The question of `record` (a Record, or a mapping with question / options / answer) laid out
    with the named template."""
    template = prompt_template(name)
    f = fields_of(record)
    if not f.question.strip():
        raise ValueError("record.question: empty")
    kind = record_kind(f)
    if kind not in template.kinds:
        need = "options" if CHOICE in template.kinds else "no options"
        raise ValueError(f"record.options: prompt template {name!r} needs a record with {need}; "
                         f"this one has {'options' if f.options else 'none'}")
    return template.render(f)


def medevalkit_judge_prompt(question: str, response: str, answer: str) -> str:
    """MedEvalKit's LLM-judge prompt (``get_compare_messages``); the judge answers
    ``<judge>0</judge>`` for correct, ``<judge>1</judge>`` for incorrect."""
    for name, v in (("question", question), ("response", response), ("answer", answer)):
        if not isinstance(v, str):
            raise TypeError(f"{name}: expected a str, got {type(v).__name__}")
    return _JUDGE.format(question=question, answer=answer, response=response)


__all__ = ["PROMPTS", "PromptTemplate", "prompt_template", "format_prompt", "medevalkit_judge_prompt"]
