"""SLAKE (Liu et al., ISBI 2021): bilingual radiology VQA with organ boxes; English only.

Layouts (paths relative to --root, or to a ``Slake1.0/`` folder inside it):

- ``slake-json`` (the official release; also vendored in xiaoman-zhang/PMC-VQA ``Slake1.0/``
  and mirrored as BoKelvin/SLAKE): ``train.json``, ``validate.json`` (``validation.json`` in the
  Hugging Face mirror), ``test.json``: lists of {img_id, img_name ("xmlab102/source.jpg"),
  question, answer, q_lang, location, modality, answer_type, base_type, content_type, triple,
  qid}; images ``imgs/<img_name>``; organ boxes ``imgs/<folder>/detection.json``.
- ``slake-csv`` (PMC-VQA's MedVInT evaluation split): ``test_open.csv`` / ``test_close.csv``
  with img_id, img_name, question, answer: the 645 open and 416 closed English test questions.
  Read only when the json files are absent.

Only ``q_lang == "en"`` is kept (the Chinese half is counted as filtered by design).

ROI boxes (``--slake-roi question``, the default) come from the question alone, never the
answer; see :func:`matched_labels` for the rule.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from medlvr.data.records import FieldError, image_size
from medlvr.imageio import ImageReadError

from ._base import Bad, ConvertReport, Options, answer_type_of, csv_rows, find_root, objects, read_json_list, text

NAME = "slake"
DROP_DUPLICATES = False

_SPLIT_FILES = (("train", "train.json"), ("val", "validate.json"), ("val", "validation.json"), ("test", "test.json"))
_CSV_FILES = (("test_close.csv", "closed"), ("test_open.csv", "open"))

# --- which boxes a question names ---------------------------------------------------------------

# Plurals that do not end in a plain -s / -es / -ies (anatomy the SLAKE questions use).
_IRREGULAR = {"vertebrae": "vertebra", "bronchi": "bronchus", "pelves": "pelvis", "testes": "testis",
              "femora": "femur", "feet": "foot", "teeth": "tooth", "ilia": "ilium", "atria": "atrium",
              "lumina": "lumen", "phalanges": "phalanx", "cortices": "cortex",
              "appendices": "appendix", "diverticula": "diverticulum", "calyces": "calyx"}
_KEEP_S = ("ss", "us", "is", "as")  # mass, uterus, pelvis, pancreas: singular words that end in -s


def word_key(word: str) -> str:
    """A word's comparison key: lower case and singular ("Lungs" -> "lung", "arteries" -> "artery")."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "xes", "ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(_KEEP_S):
        return w[:-1]
    return w


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def matched_labels(question: str, labels: list[str]) -> list[int]:
    """Indices of the box labels a question names.

    1. Case, punctuation, ``_``/``-`` and singular/plural do not matter: both sides are split
       into words and each word is compared by :func:`word_key` ("Lungs" names "Lung").
    2. A label matches where all of its words appear in order in the question ("the left lung"
       names "Left Lung"). When one match lies inside a longer one, only the longer label
       attaches ("left lung" does not also attach "Lung").
    3. A question word that is the last word (the organ) of multi-word labels and is not part of
       a longer match attaches all of them when it is plural ("lungs": "Lung", "Left Lung" and
       "Right Lung") or when no label is that word alone ("which kidney" with only "Left Kidney"
       and "Right Kidney" boxes: both).
    The answer is never read: which box a question gets cannot depend on its answer.
    """
    qw = _words(question)
    qk = [word_key(w) for w in qw]
    lk = [[word_key(w) for w in _words(lab)] for lab in labels]
    spans = []  # (label index, start, end) of every whole-label match
    for j, keys in enumerate(lk):
        n = len(keys)
        if n == 0:
            continue
        for s in range(len(qk) - n + 1):
            if qk[s:s + n] == keys:
                spans.append((j, s, s + n))
    live = [sp for sp in spans
            if not any(o[1] <= sp[1] and sp[2] <= o[2] and (o[2] - o[1]) > (sp[2] - sp[1]) for o in spans)]
    hit = {j for j, _, _ in live}
    covered = {i for _, s, e in live if e - s > 1 for i in range(s, e)}
    single = {(j, s) for j, s, e in live if e - s == 1}
    for i, key in enumerate(qk):
        if i in covered:
            continue
        heads = [j for j, keys in enumerate(lk) if len(keys) > 1 and keys[-1] == key]
        if not heads:
            continue
        plural = qw[i] != key
        alone = any(s == i for _, s in single)
        if plural or not alone:
            hit.update(heads)
    return sorted(hit)


def read_boxes(det_file: Path) -> list[tuple[str, list]]:
    """(label, [x, y, w, h]) pairs of a SLAKE detection.json.

    Reads a list of {label: [x, y, w, h]} objects (the layout as we read the release) and,
    defensively, one {label: box} object or {label: [box, box]} lists.
    """
    data = json.loads(det_file.read_text(encoding="utf-8"))
    items = data if isinstance(data, list) else [data]
    out = []
    for obj in items:
        if not isinstance(obj, dict):
            continue
        for label, box in obj.items():
            boxes = box if box and isinstance(box[0], (list, tuple)) else [box]
            for b in boxes:
                out.append((str(label), list(b)))
    return out


def _rois(img: Path, question: str, mode: str, report: ConvertReport) -> list[dict]:
    det = img.parent / "detection.json"
    if mode == "none" or not det.is_file() or not img.is_file():
        return []
    try:
        w, h = image_size(str(img))
    except ImageReadError as e:
        raise FieldError("images[0]", str(e)) from None
    try:
        boxes = read_boxes(det)
    except (ValueError, UnicodeDecodeError) as e:
        raise FieldError("rois", f"{det}: unreadable detection.json ({e})") from None
    keep = set(range(len(boxes))) if mode == "all" else set(matched_labels(question, [lab for lab, _ in boxes]))
    rois = []
    for k, (label, b) in enumerate(boxes):
        if k not in keep:
            continue
        if len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
            raise FieldError("rois", f"{det}: box for {label!r} is not [x, y, w, h]: {b!r}")
        x, y, bw, bh = (float(v) for v in b)
        box = [max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)]
        if box != [x, y, x + bw, y + bh]:
            # Counted in the report: annotation boxes that overhang the image by a pixel or two
            # would otherwise fail validation and lose the question.
            report.boxes_clipped += 1
        rois.append({"image": 0, "box": box})
    return rois


def _record(root: Path, e: dict, split: str, rid: str, opts: Options, report: ConvertReport, answer_type: str):
    name = text(e.get("img_name"))
    img = root / "imgs" / name
    question, answer = text(e.get("question")), text(e.get("answer"))
    try:
        rois = _rois(img, question, opts.slake_roi, report) if name else []
    except FieldError as bad:
        return Bad(bad.field, bad.message)
    meta = {k: text(e.get(k)) for k in ("base_type",) if text(e.get(k))}
    return {"id": rid, "images": [str(img)] if name else [], "question": question, "answer": answer,
            "options": None, "rois": rois, "split": split, "source": "slake",
            "qtype": text(e.get("content_type")), "answer_type": answer_type,
            "modality": text(e.get("modality")), "body_part": text(e.get("location")), "meta": meta}


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, [n for _, n in _SPLIT_FILES] + [n for n, _ in _CSV_FILES], ["Slake1.0", "SLAKE", "Slake"])
    found = [(s, root / n) for s, n in _SPLIT_FILES if (root / n).is_file()]
    if (root / "validate.json").is_file() and (root / "validation.json").is_file():
        found = [(s, f) for s, f in found if f.name != "validation.json"]
        report.note("validation.json ignored: validate.json (the official name) is read")
    csvs = [(root / n, t) for n, t in _CSV_FILES if (root / n).is_file()]
    if found:
        report.layouts.append("slake-json")
        if csvs:
            report.note("test_open.csv / test_close.csv ignored: the official json files are read")
        for split, f in found:
            def one(e, i, split=split):
                lang = text(e.get("q_lang")).lower()
                if lang not in ("en", ""):
                    report.total += 1
                    report.filter(f"q_lang {lang!r} (only English is kept)")
                    return
                rid = f"slake-{text(e.get('qid')) or f'{split}-{i}'}"
                yield _record(root, e, split, rid, opts, report, answer_type_of(e.get("answer_type")))

            yield from objects(f, read_json_list, one)
        return
    if csvs:
        report.layouts.append("slake-csv")
        report.note("only the English test questions (PMC-VQA's test_open.csv / test_close.csv) are in this layout")
        for f, atype in csvs:
            yield from objects(f, csv_rows, lambda row, i, f=f, atype=atype: [
                _record(root, row, "test", f"slake-{f.stem}-{i}", opts, report, atype)])
        return
    raise FileNotFoundError(f"root: expected train.json / validate.json / test.json (or test_open.csv / "
                            f"test_close.csv) in {root} or its Slake1.0/ folder")
