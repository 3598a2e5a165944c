"""PMC-VQA (Zhang et al., 2023): multiple-choice questions on PubMed Central figures.

Layouts (the Hugging Face release xmcmic/PMC-VQA, as its README and the loaders in
xiaoman-zhang/PMC-VQA and MedEvalKit read it), paths relative to --root or a ``PMC-VQA/``
folder inside it:

- ``pmc-vqa-v1``: ``train.csv`` (176,948 rows), ``test.csv`` (50,000) and ``test_clean.csv``
  (2,000, the set papers report); columns Figure_path, Question, Answer (``Anwser`` in the first
  README), Choice A .. Choice D (" A:Diffuse uptake pattern "), Answer_label; images from
  images.zip (``images/``, or ``images/images/`` as it unpacks).
- ``pmc-vqa-v2``: ``train_2.csv`` (152,603) and ``test_2.csv`` (33,430); columns index,
  Figure_path, Caption, Question, Choice A .. Choice D, Answer (the letter), split; images from
  images_2.zip (``figures/``, or ``images_2/figures/``).

``--pmc-vqa-version auto`` (default) reads v2 when train_2.csv / test_2.csv are there, else v1;
for v1 ``--pmc-vqa-test clean`` (default) reads test_clean.csv as the test split and ``full``
test.csv. Choice texts lose their "A:" prefix (which is sometimes the wrong letter) and stray
quotes. An entry whose Answer_label is not A-D, or (v1) whose labelled choice is not the Answer
text, is a reported bad entry (31 of train.csv as others counted them).
"""
from __future__ import annotations

import re
from pathlib import Path

from ._base import Bad, ConvertReport, FileBad, Options, find_root, first_existing, read_csv, text

NAME = "pmc-vqa"
DROP_DUPLICATES = False
_LETTERS = "ABCD"
_STRIP = " \t\r\n\xa0\u200a'\""
_PREFIX = re.compile(r"^[A-Da-d]\s*[:.)]\s*")


def clean(s) -> str:
    return text(s).strip(_STRIP)


def choice_text(s) -> str:
    """' A:Diffuse uptake pattern ' -> 'Diffuse uptake pattern' (any letter's prefix goes)."""
    return clean(_PREFIX.sub("", clean(s), count=1))


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def _row(e: dict, version: int, split: str, rid: str, img_dirs: list[Path]):
    options = [choice_text(e.get(f"Choice {k}")) for k in _LETTERS]
    if version == 1:
        label = clean(e.get("Answer_label"))
        answer = clean(e.get("Answer", e.get("Anwser")))
        field = "Answer_label"
    else:
        label = clean(e.get("Answer"))
        answer = None
        field = "Answer"
    if label.upper() not in _LETTERS or len(label) != 1:
        return Bad(field, f"expected one of A-D, got {text(e.get(field))!r}")
    chosen = options[_LETTERS.index(label.upper())]
    if answer is not None and not _same(chosen, answer):
        return Bad("Answer", f"Choice {label.upper()} is {chosen!r} but Answer is {answer!r}")
    fig = text(e.get("Figure_path"))
    img = first_existing(d / fig for d in img_dirs) if fig else None
    return {"id": rid, "images": [str(img)] if img else [], "question": clean(e.get("Question")), "answer": chosen,
            "options": options, "split": split, "source": "pmc-vqa", "answer_type": "closed"}


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, ["train_2.csv", "test_2.csv", "train.csv", "test_clean.csv", "test.csv"],
                     ["PMC-VQA", "pmc-vqa", "PMC_VQA"])
    v2 = [(s, root / n) for s, n in (("train", "train_2.csv"), ("test", "test_2.csv")) if (root / n).is_file()]
    test_name = "test_clean.csv" if opts.pmc_vqa_test == "clean" else "test.csv"
    v1 = [(s, root / n) for s, n in (("train", "train.csv"), ("test", test_name)) if (root / n).is_file()]
    version = {"1": 1, "2": 2}.get(str(opts.pmc_vqa_version), 2 if v2 else 1)
    files = v2 if version == 2 else v1
    if not files:
        want = "train_2.csv / test_2.csv" if version == 2 else f"train.csv / {test_name}"
        raise FileNotFoundError(f"root: expected {want} in {root} (PMC-VQA v{version})")
    report.layouts.append(f"pmc-vqa-v{version}")
    if version == 2 and v1:
        report.note("v1 files (train.csv, test*.csv) present but not read: pass --pmc-vqa-version 1 for them")
    if version == 1 and v2:
        report.note("v2 files (train_2.csv, test_2.csv) present but not read")
    if version == 1 and opts.pmc_vqa_test == "clean" and (root / "test.csv").is_file():
        report.note("test.csv (50,000) not read: test_clean.csv (2,000) is the test split; "
                    "--pmc-vqa-test full reads test.csv")
    if version == 2:
        img_dirs = [root / "figures", root / "images_2" / "figures", root / "images" / "figures", root / "images", root]
    else:
        img_dirs = [root / "images", root / "images" / "images", root / "figures", root]
    for split, f in files:
        try:
            header, rows = read_csv(f)
        except FileBad as ex:
            yield f, 0, Bad(ex.field, ex.reason)
            continue
        need = {"Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D"}
        if not need <= set(header):
            yield f, 0, Bad("<header>", f"expected columns {sorted(need)}, got {header}")
            continue
        for i, e in enumerate(rows, start=1):
            key = text(e.get("index")) if version == 2 and text(e.get("index")) else str(i)
            row_split = text(e.get("split")).lower() if version == 2 else ""
            yield f, i, _row(e, version, row_split if row_split in ("train", "test") else split,
                             f"pmc-vqa-{f.stem}-{key}", img_dirs)
