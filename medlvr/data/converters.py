"""`medlvr convert`: published annotation layouts -> the medlvr JSONL format (medlvr/data/records.py).

Layouts read (paths relative to --root; see docs/data.md for the sources and open questions):

- omnimedvqa: QA_information/{Open-access,Restricted-access}/<dataset>.json, each a JSON list of
  {question_id, dataset, question_type, modality_type (one file spells it "modality"), question,
  gt_answer, option_A .. option_D, image_path (relative to the root, "Images/<dataset>/...")}.
  A benchmark without official splits: every record is "test" unless --split-fractions asks for
  a deterministic per-image hash split.
- vqa-rad: "VQA_RAD Dataset Public.json", a list of {qid, image_name, question, answer,
  answer_type, question_type, phrase_type, ...}; images in "VQA_RAD Image Folder/". Records
  whose phrase_type starts with "test" (test_freeform, test_para) are test, the rest train.
- slake: train.json, validate.json (or validation.json), test.json, lists of {qid, img_name
  ("xmlab0/source.jpg"), question, answer, answer_type, content_type, q_lang, location, ...};
  images in imgs/. Only q_lang == "en" is kept. ROI boxes come from imgs/<folder>/detection.json
  (organ -> [x, y, w, h] in pixels); by default a box is attached when its label is named in
  the question or the answer (--slake-roi question|all|none).
- pathvqa: qas/<split>/<split>_qa.pkl (or .json), lists of {image, question, answer}; images
  in images/<split>/<image>.jpg; splits train, val, test. The .pkl is a Python pickle: only
  convert files from a source you trust.

Images may be anything medlvr/imageio/reader.py reads (PNG/JPEG, DICOM files or series
folders, NIfTI, 16-bit PNG/TIFF); --window names the windowing preset written into every
record (used for DICOM/NIfTI images that carry no window of their own).

Every converted record is validated like a JSONL line (images exist, boxes inside the image,
options contain the answer). A bad source entry raises DataError naming the source file, the
entry number (1-based, as the "line") and the field, unless skip_bad; skipped entries are
counted and listed in the report, never dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medlvr.imageio import ImageReadError, parse_window
from medlvr.data.records import _Bad, DataError, Record, image_size, parse_record, write_jsonl

DATASETS = ("omnimedvqa", "vqa-rad", "slake", "pathvqa")


@dataclass
class ConvertReport:
    dataset: str
    out: str
    total: int = 0
    counts: dict = field(default_factory=dict)          # split -> records written
    skipped: list = field(default_factory=list)         # (source file, entry, field, message)
    filtered: int = 0                                   # dropped by design (e.g. SLAKE non-English)
    rois: int = 0
    boxes_clipped: int = 0                              # boxes cut to the image bounds

    @property
    def n_bad(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        written = sum(self.counts.values())
        lines = [f"{self.dataset} -> {self.out}: {written} records "
                 f"({', '.join(f'{k}: {v}' for k, v in sorted(self.counts.items()))}), {self.rois} ROI boxes, "
                 f"{self.n_bad} bad skipped, {self.filtered} filtered out by design"]
        if self.boxes_clipped:
            lines.append(f"  {self.boxes_clipped} ROI boxes extended past their image and were clipped to it")
        lines += [f"  {f}:{e}: field '{fld}': {m} (skipped)" for f, e, fld, m in self.skipped]
        return "\n".join(lines)


# Each reader yields (source file, entry number, raw dict in the medlvr record layout); the
# dict may raise _Bad lazily through the sentinel `_BadEntry`.
class _BadEntry(dict):
    def __init__(self, fld: str, msg: str):
        super().__init__()
        self.fld, self.msg = fld, msg


def _hash_split(key: str, fractions) -> str:
    """Deterministic split from a key (an image path: all questions on an image stay together)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    a, b, _ = fractions
    return "train" if u < a else ("val" if u < a + b else "test")


def _str(v) -> str:
    return "" if v is None else str(v).strip()


def _read_json_list(path: Path) -> list:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise DataError(path, 1, "<file>", f"expected a JSON list of entries, got {type(data).__name__}")
    return data


def _omnimedvqa(root: Path, *, split_fractions=None, **_) -> Iterator[tuple[Path, int, dict]]:
    qa_dir = root / "QA_information"
    files = sorted(p for sub in ("Open-access", "Restricted-access") for p in (qa_dir / sub).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"root: no QA_information/{{Open-access,Restricted-access}}/*.json under {root}")
    for f in files:
        for i, e in enumerate(_read_json_list(f), start=1):
            if not isinstance(e, dict):
                yield f, i, _BadEntry("<entry>", f"expected an object, got {type(e).__name__}")
                continue
            options = [_str(e[k]) for k in ("option_A", "option_B", "option_C", "option_D", "option_E")
                       if _str(e.get(k))]
            img = _str(e.get("image_path"))
            split = _hash_split(img, split_fractions) if split_fractions else "test"
            ds = _str(e.get("dataset")) or f.stem
            yield f, i, {
                "id": f"omnimedvqa-{_str(e.get('question_id')) or f'{ds}-{i}'}",
                "images": [str(root / img)] if img else [],
                "question": _str(e.get("question")), "answer": _str(e.get("gt_answer")),
                "options": options or None, "split": split, "source": f"omnimedvqa/{ds}",
                "qtype": _str(e.get("question_type")),
            }


def _vqa_rad(root: Path, **_) -> Iterator[tuple[Path, int, dict]]:
    f = root / "VQA_RAD Dataset Public.json"
    if not f.is_file():
        raise FileNotFoundError(f"root: expected '{f.name}' in {root}")
    img_dir = root / "VQA_RAD Image Folder"
    for i, e in enumerate(_read_json_list(f), start=1):
        if not isinstance(e, dict):
            yield f, i, _BadEntry("<entry>", f"expected an object, got {type(e).__name__}")
            continue
        name = _str(e.get("image_name"))
        phrase = _str(e.get("phrase_type")).lower()
        yield f, i, {
            "id": f"vqa-rad-{_str(e.get('qid')) or i}",
            "images": [str(img_dir / name)] if name else [],
            "question": _str(e.get("question")), "answer": _str(e.get("answer")), "options": None,
            "split": "test" if phrase.startswith("test") else "train", "source": "vqa-rad",
            "qtype": _str(e.get("question_type")),
        }


def _slake_boxes(det_file: Path) -> list[tuple[str, list]]:
    """(label, [x, y, w, h]) pairs of a SLAKE detection.json.

    Accepts a list of {label: [x, y, w, h]} objects (the layout of the release as we read it)
    and, defensively, one {label: box} object or {label: [box, box]} lists.
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


def _slake_rois(img: Path, question: str, answer: str, mode: str, report: ConvertReport) -> list[dict]:
    """ROI dicts for one SLAKE question from the detection.json next to its image."""
    det = img.parent / "detection.json"
    if mode == "none" or not det.is_file() or not img.is_file():
        return []
    text = f" {question} {answer} ".lower()
    try:
        w, h = image_size(str(img))
    except ImageReadError as e:
        raise _Bad("images[0]", str(e)) from None
    rois = []
    for label, b in _slake_boxes(det):
        if mode == "question" and not re.search(rf"\b{re.escape(label.lower())}\b", text):
            continue
        if len(b) != 4 or not all(isinstance(v, (int, float)) for v in b):
            raise _Bad("rois", f"{det}: box for {label!r} is not [x, y, w, h]: {b!r}")
        x, y, bw, bh = (float(v) for v in b)
        box = [max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)]
        if box != [x, y, x + bw, y + bh]:
            # Counted in the report: annotation boxes that overhang the image by a pixel or two
            # would otherwise fail validation and lose the question.
            report.boxes_clipped += 1
        rois.append({"image": 0, "box": box})
    return rois


def _slake(root: Path, *, slake_roi: str = "question", report: ConvertReport, **_) -> Iterator[tuple[Path, int, dict]]:
    split_files = [("train", "train.json"), ("val", "validate.json"), ("val", "validation.json"), ("test", "test.json")]
    found = [(s, root / n) for s, n in split_files if (root / n).is_file()]
    if not found:
        raise FileNotFoundError(f"root: expected train.json / validate.json / test.json in {root}")
    for split, f in found:
        for i, e in enumerate(_read_json_list(f), start=1):
            if not isinstance(e, dict):
                yield f, i, _BadEntry("<entry>", f"expected an object, got {type(e).__name__}")
                continue
            if _str(e.get("q_lang")).lower() not in ("en", ""):
                report.filtered += 1
                continue
            name = _str(e.get("img_name"))
            img = root / "imgs" / name
            question, answer = _str(e.get("question")), _str(e.get("answer"))
            try:
                rois = _slake_rois(img, question, answer, slake_roi, report) if name else []
            except _Bad as bad:
                yield f, i, _BadEntry(bad.field, bad.message)
                continue
            yield f, i, {
                "id": f"slake-{_str(e.get('qid')) or f'{split}-{i}'}",
                "images": [str(img)] if name else [], "question": question, "answer": answer,
                "options": None, "rois": rois, "split": split, "source": "slake",
                "qtype": _str(e.get("content_type")),
            }


def _pathvqa(root: Path, **_) -> Iterator[tuple[Path, int, dict]]:
    any_found = False
    for split in ("train", "val", "test"):
        base = root / "qas" / split
        f = next((p for p in (base / f"{split}_qa.pkl", base / f"{split}_qa.json") if p.is_file()), None)
        if f is None:
            continue
        any_found = True
        if f.suffix == ".pkl":
            with f.open("rb") as fh:
                entries = pickle.load(fh)  # the published format; see the module docstring
        else:
            entries = _read_json_list(f)
        for i, e in enumerate(entries, start=1):
            if not isinstance(e, dict):
                yield f, i, _BadEntry("<entry>", f"expected an object, got {type(e).__name__}")
                continue
            name = _str(e.get("image"))
            img_dir = root / "images" / split
            cands = [img_dir / name] if Path(name).suffix else [
                img_dir / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg", ".dcm")]
            img = next((c for c in cands if c.is_file()), cands[0])
            yield f, i, {
                "id": f"pathvqa-{split}-{i}", "images": [str(img)] if name else [],
                "question": _str(e.get("question")), "answer": _str(e.get("answer")), "options": None,
                "split": split, "source": "pathvqa",
                "qtype": "yes/no" if _str(e.get("answer")).lower() in ("yes", "no") else "open",
            }
    if not any_found:
        raise FileNotFoundError(f"root: expected qas/<split>/<split>_qa.pkl (or .json) under {root}")


_READERS = {"omnimedvqa": _omnimedvqa, "vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa}


def convert(dataset: str, root, out, *, skip_bad: bool = False, split_fractions=None,
            slake_roi: str = "question", window: str | None = None) -> ConvertReport:
    """Convert `dataset` found under `root` into the JSONL file `out`; returns the report.

    window: a preset or "W/L" pair written into every record (medlvr/imageio/windowing.py)."""
    parse_window(window)
    if dataset not in _READERS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if slake_roi not in ("question", "all", "none"):
        raise ValueError(f"slake_roi: expected 'question', 'all' or 'none', got {slake_roi!r}")
    if split_fractions is not None:
        if len(split_fractions) != 3 or any(x < 0 for x in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions: expected 3 non-negative fractions summing to 1, got {split_fractions!r}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"root: not a directory: {root}")
    report = ConvertReport(dataset=dataset, out=str(out))
    records: list[Record] = []
    seen: set[str] = set()
    for src, entry, obj in _READERS[dataset](root, split_fractions=split_fractions, slake_roi=slake_roi, report=report):
        report.total += 1
        try:
            if isinstance(obj, _BadEntry):
                raise _Bad(obj.fld, obj.msg)
            if window:
                obj["window"] = window
            rec = parse_record(obj, base_dir=root, default_source=dataset, default_id=f"{dataset}-{report.total}")
            if rec.id in seen:
                raise _Bad("id", f"duplicate id {rec.id!r}")
            seen.add(rec.id)
        except _Bad as bad:
            if not skip_bad:
                raise DataError(src, entry, bad.field, f"(entry {entry}) {bad.message}") from None
            report.skipped.append((str(src), entry, bad.field, bad.message))
            continue
        records.append(rec)
        report.counts[rec.split] = report.counts.get(rec.split, 0) + 1
        report.rois += len(rec.rois)
    write_jsonl(out, records)
    return report
