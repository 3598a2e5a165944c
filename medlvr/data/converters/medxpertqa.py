"""MedXpertQA MM (Zuo et al., ICML 2025): expert-level multimodal medical exam questions.

Layouts (paths relative to --root):

- ``medxpertqa-hf`` (the Hugging Face release TsinghuaC3I/MedXpertQA): ``MM/test.jsonl``
  (2,000 questions) and ``MM/dev.jsonl`` (5), lines {id, question, options: {A: text, ...},
  label: "A", images: [file name, ...], medical_task, body_system, question_type}; images from
  images.zip in ``images/`` (or ``MM/images/``). ``Text/`` (no images) is not read.
- ``medxpertqa-eval`` (the official evaluation input, TsinghuaC3I/MedXpertQA
  ``eval/data/medxpertqa/input/medxpertqa_mm_input.jsonl``, the test split re-shaped by
  ``eval/data/prepare_medxpertqa.ipynb``): options [{letter, content}], label ["A"],
  images [{image_path}]; images in ``images/`` of the folder the evaluation runs in (looked for
  at the root and beside the file). ``medxpertqa_sampled_mm_input.jsonl`` (a 199-question
  sample) is read only when the full file is absent.

Splits: test -> test, dev -> train (the few-shot pool). The question text carries its choices
("...\nAnswer Choices: (A) ... (E) ..."); that tail is cut because records list the options
themselves. answer_type closed; question_type (Reasoning / Understanding) -> qtype,
body_system -> body_part, medical_task -> meta.
"""
from __future__ import annotations

import re
from pathlib import Path

from ._base import Bad, ConvertReport, Options, find_root, first_existing, not_an_object, read_jsonl, text

NAME = "medxpertqa-mm"
DROP_DUPLICATES = False
_CHOICES = re.compile(r"\s*Answer Choices:\s*\(A\).*\Z", re.S)
_EVAL_DIRS = ("", "input", "eval/data/medxpertqa/input", "data/medxpertqa/input", "medxpertqa/input")
_EVAL_NAMES = ("medxpertqa_mm_input.jsonl", "medxpertqa_sampled_mm_input.jsonl")


def strip_choices(q: str) -> str:
    return _CHOICES.sub("", q).strip()


def _options(raw) -> dict | None:
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    if isinstance(raw, list) and all(isinstance(o, dict) for o in raw):
        return {text(o.get("letter")): text(o.get("content")) for o in raw}
    return None


def _record(e: dict, split: str, img_dirs: list[Path]):
    opts = _options(e.get("options"))
    if not opts:
        return Bad("options", f"expected {{letter: text}} or [{{letter, content}}], got {e.get('options')!r}")
    label = e.get("label")
    label = text(label[0]) if isinstance(label, list) and len(label) == 1 else text(label)
    if label not in opts:
        return Bad("label", f"{e.get('label')!r} is not one of the option letters {sorted(opts)}")
    names = []
    for im in e.get("images") or []:
        name = text(im.get("image_path")) if isinstance(im, dict) else text(im)
        if name:
            names.append(name)
    images = [str(first_existing(d / n for d in img_dirs)) for n in names]
    letters = sorted(opts)
    return {"id": f"medxpertqa-{text(e.get('id'))}", "images": images, "question": strip_choices(text(e.get("question"))),
            "answer": opts[label], "options": [opts[k] for k in letters], "split": split, "source": "medxpertqa-mm",
            "qtype": text(e.get("question_type")), "answer_type": "closed", "body_part": text(e.get("body_system")),
            "meta": {"medical_task": text(e.get("medical_task"))} if text(e.get("medical_task")) else {}}


def _lines(f: Path, split: str, img_dirs: list[Path]):
    for i, e in read_jsonl(f):
        bad = e if isinstance(e, Bad) else not_an_object(e)
        yield f, i, bad or _record(e, split, img_dirs)


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, ["MM/test.jsonl", "MM/dev.jsonl"] + [f"{d}/{n}".lstrip("/") for d in _EVAL_DIRS
                                                                  for n in _EVAL_NAMES], ["MedXpertQA"])
    hf = [(s, root / "MM" / f"{n}.jsonl") for n, s in (("test", "test"), ("dev", "train"))
          if (root / "MM" / f"{n}.jsonl").is_file()]
    if hf:
        report.layouts.append("medxpertqa-hf")
        if (root / "Text").is_dir():
            report.note("Text/ (text-only questions) not read")
        img_dirs = [root / "images", root / "MM" / "images", root / "images" / "images", root]
        for split, f in hf:
            yield from _lines(f, split, img_dirs)
        return
    for d in _EVAL_DIRS:
        for n in _EVAL_NAMES:
            f = root / d / n
            if not f.is_file():
                continue
            report.layouts.append("medxpertqa-eval")
            if n != _EVAL_NAMES[0]:
                report.note(f"{n} is the 199-question sample of the test split, not the full 2,000")
            dirs, p = [], f.parent
            while True:  # images/ at the root, beside the file, or in a folder between them
                dirs.append(p / "images")
                if p == root or p == p.parent:
                    break
                p = p.parent
            yield from _lines(f, "test", [root / "images"] + dirs + [root])
            return
    raise FileNotFoundError(f"root: expected MM/test.jsonl (Hugging Face release) or medxpertqa_mm_input.jsonl "
                            f"(the evaluation input) under {root}")
