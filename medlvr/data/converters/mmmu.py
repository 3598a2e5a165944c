"""MMMU (Yue et al., CVPR 2024), the Health & Medicine discipline: Basic_Medical_Science,
Clinical_Medicine, Diagnostics_and_Laboratory_Medicine, Pharmacy, Public_Health.

Layout ``mmmu-hf-parquet`` (the Hugging Face release MMMU/MMMU as ``huggingface-cli download
MMMU/MMMU --repo-type dataset`` writes it), paths relative to --root or an ``MMMU/`` folder
inside it: ``<Subject>/{dev,validation,test}-00000-of-00001.parquet`` with columns id, question,
options (a Python list written as a string), explanation, image_1 .. image_7 ({bytes, path} or
null), img_type, answer, topic_difficulty, question_type (multiple-choice / open), subfield.
Other subjects' folders are counted as filtered. Reading parquet needs ``pyarrow``.

Images are stored inside the parquet files; they are written once to ``<out stem>_images/``
beside the output (``<id>_<k>.<ext>``) and the records point there. Splits: validation -> val
(30 a subject, 150 in all), test -> test (1,752), dev -> train (the 5-a-subject few-shot pool).
The test answers are withheld in the release ("?"): such questions are filtered out unless
``--answers FILE`` gives them, a JSON object {id: letter-or-text} or {id: {"ground_truth": ...}}
(the layout of MMMU's answer_dict_val.json).

Multiple-choice answers (a letter) become the option text; answer_type closed for
multiple-choice, open for open questions; img_type -> modality; subject, subfield and
topic_difficulty -> meta. The "<image k>" markers stay in the question text.
"""
from __future__ import annotations

import ast
import io
from pathlib import Path

from medlvr.imageio.errors import MissingDependency

from ._base import Bad, ConvertReport, FileBad, Options, find_root, read_json, text

NAME = "mmmu-med"
DROP_DUPLICATES = False
SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
            "Public_Health")
_SPLITS = (("dev", "train"), ("validation", "val"), ("test", "test"))
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependency("reading MMMU's parquet files needs the optional package 'pyarrow', which is "
                                "not installed: pip install 'medlvr[parquet]'") from e
    return pq


def _literal_list(s) -> list | None:
    if isinstance(s, list):
        return s
    try:
        v = ast.literal_eval(text(s)) if text(s) else []
    except (ValueError, SyntaxError):
        return None
    return v if isinstance(v, list) else None


def _load_answers(path) -> dict:
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise FileBad("<file>", "expected an object {id: answer}")
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            v = v.get("ground_truth", v.get("answer"))
        if isinstance(v, (str, int, float)):
            out[str(k)] = text(v)
    return out


def _ext(img: dict, data: bytes) -> str:
    suffix = Path(text(img.get("path"))).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"):
        return suffix
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "PNG").lower()
    except Exception:
        return ".png"
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def _write_image(image_dir: Path, rid: str, k: int, img) -> str | None:
    if not isinstance(img, dict) or not img.get("bytes"):
        return None
    data = img["bytes"]
    p = image_dir / f"{rid}_{k}{_ext(img, data)}"
    if not (p.is_file() and p.read_bytes() == data):
        image_dir.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(p)


def _record(e: dict, split: str, image_dir: Path, answers: dict, report: ConvertReport):
    rid = text(e.get("id"))
    qtype = text(e.get("question_type"))
    answer = text(e.get("answer"))
    if answer in ("", "?") and rid in answers:
        answer = answers[rid]
    if answer in ("", "?"):
        report.filter("answer withheld (MMMU test split; --answers FILE supplies the answers)")
        return None
    options = _literal_list(e.get("options"))
    if options is None:
        return Bad("options", f"not a list: {text(e.get('options'))[:80]!r}")
    options = [text(o) for o in options]
    if qtype == "multiple-choice":
        if len(answer) == 1 and answer.upper() in _LETTERS[:len(options)]:
            answer = options[_LETTERS.index(answer.upper())]
        elif answer not in options:
            return Bad("answer", f"{answer!r} is not a letter of the {len(options)} options")
    images = []
    for k in range(1, 8):
        p = _write_image(image_dir, rid or "mmmu", k, e.get(f"image_{k}"))
        if p:
            images.append(p)
    img_type = _literal_list(e.get("img_type")) or []
    meta = {k: text(e.get(k)) for k in ("subfield", "topic_difficulty") if text(e.get(k))}
    return {"id": f"mmmu-{rid}", "images": images, "question": text(e.get("question")), "answer": answer,
            "options": options if qtype == "multiple-choice" and options else None, "split": split,
            "source": "mmmu-med", "qtype": qtype,
            "answer_type": "closed" if qtype == "multiple-choice" else "open",
            "modality": "; ".join(text(t) for t in img_type), "meta": meta}


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, [f"{s}" for s in SUBJECTS], ["MMMU"])
    found = [(subj, hf, split, p) for subj in SUBJECTS for hf, split in _SPLITS
             for p in sorted((root / subj).glob(f"{hf}-*.parquet"))]
    others = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d.name not in SUBJECTS
              and any(d.glob("*.parquet"))]
    if not found:
        raise FileNotFoundError(f"root: expected <Subject>/{{dev,validation,test}}-*.parquet for the Health & "
                                f"Medicine subjects ({', '.join(SUBJECTS)}) under {root}")
    pq = _pyarrow()
    report.layouts.append("mmmu-hf-parquet")
    if others:
        report.note(f"{len(others)} other subjects not read (not Health & Medicine): {', '.join(others)}")
    missing = [s for s in SUBJECTS if not (root / s).is_dir()]
    if missing:
        report.note(f"Health & Medicine subjects missing: {', '.join(missing)}")
    answers = {}
    if opts.answers:
        try:
            answers = _load_answers(opts.answers)
        except FileBad as e:
            raise ValueError(f"--answers {opts.answers}: {e.reason}") from None
    image_dir = opts.image_dir or (root / "_images")
    for subj, hf, split, p in found:
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as ex:  # pyarrow raises its own error types for a damaged file
            yield p, 0, Bad("<file>", f"unreadable parquet ({type(ex).__name__}: {ex})")
            continue
        for i, e in enumerate(rows, start=1):
            rec = _record(e, split, image_dir, answers, report)
            if rec is None:
                report.total += 1
                continue
            if isinstance(rec, dict):
                rec["meta"] = {"subject": subj, **rec["meta"]}
            yield p, i, rec
