"""Scoring protocols for medical VQA: each standard toolkit's rule, named and cited.

Which answers count as right differs between toolkits far more than between models ("The answer is
yes" is right for MedEvalKit and LLaVA-Med and wrong for medlvr's old rule; "B" for option B is
wrong for OmniMedVQA's official scorer). A number is only comparable with a paper's when it was
scored the paper's way, so each rule is a protocol here, written from the toolkit's code (repo,
commit, file, function in each module) with its quirks, and pinned by >= 50 cases whose expected
results came from running the toolkit's own function (tests/data/scoring_cases/, docs/scoring.md)::

    from medlvr.data.scoring import score_with, protocol, PROTOCOLS, DEFAULT_PROTOCOL, accuracy
    s = score_with("medevalkit", "The answer is yes", record)   # Score(correct=True, counted=True, value=1.0)
    acc = accuracy(score_with(name, p, r) for p, r in zip(preds, records))

Protocols (`PROTOCOLS`; a record is "choice" with options, "yes_no" with a yes/no gold, else "open";
a protocol given a kind it does not score raises ValueError naming the field):

- ``medevalkit`` (DEFAULT), ``medevalkit_mc``, ``medevalkit_closed``, ``medevalkit_close_end``,
  ``medevalkit_open``: alibaba-damo-academy/MedEvalKit (`medevalkit`);
- ``omnimedvqa``: OmniMedVQA's official scorer, OpenGVLab/Multi-Modality-Arena MedicalEval (`omnimedvqa`);
- ``med_r1``, ``med_r1_nothink``, ``medvlthinker``: strict ``<answer>`` letter scoring of Med-R1 and
  MedVLThinker (`strict_letter`);
- ``llava_med``, ``llava_med_closed``, ``llava_med_open``, ``llava_med_closed_batch``,
  ``llava_med_open_hit``, and ``llava_med_closed_as_released`` (``known_bug``: wrong yes/no answers
  leave the denominator): microsoft/LLaVA-Med v1.0 (`llava_med`);
- ``squad``: SQuAD exact match / token F1 (`squad`);
- ``medlvr``: medlvr's previous rule, `medlvr.data.answers.score`, unchanged (`medlvr_rule`).

The default is ``medevalkit`` because it is the one toolkit that scores all four benchmarks medlvr
evaluates on (OmniMedVQA, VQA-RAD, SLAKE, PathVQA: ``medlvr convert``) with one published code
base, multiple choice and yes/no and open alike, and it is what recent medical-VLM reports use for
them; OmniMedVQA's official scorer covers one benchmark, LLaVA-Med's three without multiple choice,
Med-R1 / MedVLThinker multiple choice only. Report the protocol with every number.

`Score` carries ``correct``, ``counted`` (False only where a toolkit drops the record from the
denominator), ``value`` (1/0, or LLaVA-Med recall, or SQuAD F1) and ``extras``. `accuracy` and
`mean_value` aggregate over counted records. An LLM judge is a caller-supplied `Judge`
(``judge(question, prediction, answer) -> bool``), used by the protocols that have a judge step
(``medevalkit``, ``medevalkit_open``); nothing here calls a network. Prompts as the toolkits
phrase them: `prompts.format_prompt(name, record)`, `prompts.PROMPTS`.
"""
from medlvr.data.scoring._base import (CHOICE, KINDS, OPEN, YES_NO, Judge, Score, ScoringProtocol, accuracy,
                                       mean_value, record_kind)
from medlvr.data.scoring.prompts import PROMPTS, PromptTemplate, format_prompt, medevalkit_judge_prompt, prompt_template
from medlvr.data.scoring.registry import (DEFAULT_PROTOCOL, PROTOCOLS, protocol, protocol_names, score_all,
                                          score_with)

__all__ = ["Score", "Judge", "ScoringProtocol", "PROTOCOLS", "DEFAULT_PROTOCOL", "protocol", "protocol_names",
           "score_with", "score_all", "accuracy", "mean_value", "record_kind", "KINDS", "CHOICE", "YES_NO", "OPEN",
           "PROMPTS", "PromptTemplate", "format_prompt", "prompt_template", "medevalkit_judge_prompt"]
