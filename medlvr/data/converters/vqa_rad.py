"""VQA-RAD (Lau et al., Scientific Data 2018): clinician-written questions on MedPix radiology images.

Layouts (paths relative to --root):

- ``vqa-rad-osf`` (the official Open Science Framework release, osf.io/89kps):
  ``VQA_RAD Dataset Public.json`` (the OSF name) or ``VQA_RAD_Dataset_Public.json`` (the name
  mirrors use, e.g. Edinson-T/Medical_VQA_Project): a list of 2,248 {qid, image_name,
  image_organ, question, question_rephrase, question_frame, question_type, answer,
  answer_type, phrase_type, ...}; images in ``VQA_RAD Image Folder/`` (or
  ``VQA_RAD_Image_Folder/``, ``images/``). ``phrase_type`` test_freeform / test_para -> test,
  freeform / para -> train. The 1,267 entries with a ``question_frame`` (a templated
  rephrasing) add a "frame" question with the same image and answer (``--vqa-rad-frames
  train``, the default): 3,515 questions, the published total, split 3,064 / 451 exactly as the
  MEVF split that papers report. Like MEVF, frames of test entries go to train (the split is
  by question, not by image); ``--vqa-rad-frames none`` leaves them out (1,797 / 451).
- ``vqa-rad-mevf`` (the MEVF preprocessing, aioz-ai/MICCAI19-MedVQA ``data_RAD/``, copied in
  e.g. longle0702/med-v2qa): ``trainset.json`` (3,064) and ``testset.json`` (451), entries
  {qid, image_name, image_organ, answer, answer_type, question_type, question, phrase_type};
  images in ``images/``.

Kept per record: answer_type (OPEN / CLOSED, "CLOSED " with a trailing space in two entries),
question_type (qtype), image_organ (body_part) and phrase_type (meta).
"""
from __future__ import annotations

from pathlib import Path

from ._base import ConvertReport, Options, answer_type_of, find_root, first_existing, objects, read_json_list, text

NAME = "vqa-rad"
DROP_DUPLICATES = False

OSF_NAMES = ("VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json")
_IMAGE_DIRS = ("VQA_RAD Image Folder", "VQA_RAD_Image_Folder", "images")
_NULL = ("", "null", "none")


def _base(e: dict, split: str) -> dict:
    return {"options": None, "split": split, "source": "vqa-rad", "qtype": text(e.get("question_type")),
            "answer_type": answer_type_of(e.get("answer_type")), "body_part": text(e.get("image_organ")),
            "answer": text(e.get("answer"))}


def _osf(root: Path, f: Path, opts: Options, report: ConvertReport):
    img_dir = first_existing(root / d for d in _IMAGE_DIRS)
    yield from objects(f, read_json_list, lambda e, i: _osf_entry(e, i, img_dir, opts, report))


def _osf_entry(e: dict, i: int, img_dir: Path, opts: Options, report: ConvertReport):
    """One OSF entry: its question, and its question_frame rephrasing as a train question of its own."""
    name = text(e.get("image_name"))
    phrase = text(e.get("phrase_type")).lower()
    split = "test" if phrase.startswith("test") else "train"
    qid = text(e.get("qid")) or str(i)
    images = [str(img_dir / name)] if name else []
    yield {**_base(e, split), "id": f"vqa-rad-{qid}", "images": images,
           "question": text(e.get("question")), "meta": {"phrase_type": phrase} if phrase else {}}
    frame = text(e.get("question_frame"))
    if frame.lower() in _NULL:
        return
    if opts.vqa_rad_frames == "none":
        report.total += 1
        report.filter("question_frame rephrasings left out (--vqa-rad-frames none)")
        return
    # The frame question is a source question of its own (3,515 in all), entry i again.
    yield {**_base(e, "train"), "id": f"vqa-rad-{qid}-frame", "images": images, "question": frame,
           "meta": {"phrase_type": "frame"}}


def _mevf(root: Path, opts: Options, report: ConvertReport):
    img_dir = first_existing(root / d for d in _IMAGE_DIRS[::-1])
    for split, name in (("train", "trainset.json"), ("test", "testset.json")):
        f = root / name
        if not f.is_file():
            report.note(f"{name} not found: no {split} records")
            continue
        def one(e, i, split=split):
            phrase = text(e.get("phrase_type")).lower()
            if phrase == "frame" and opts.vqa_rad_frames == "none":
                report.total += 1
                report.filter("question_frame rephrasings left out (--vqa-rad-frames none)")
                return
            name_ = text(e.get("image_name"))
            yield {**_base(e, split), "id": f"vqa-rad-{text(e.get('qid')) or f'{split}-{i}'}",
                   "images": [str(img_dir / name_)] if name_ else [], "question": text(e.get("question")),
                   "meta": {"phrase_type": phrase} if phrase else {}}

        yield from objects(f, read_json_list, one)


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, OSF_NAMES + ("trainset.json", "testset.json"), ["VQA_RAD", "VQA-RAD", "data_RAD"])
    osf = [root / n for n in OSF_NAMES if (root / n).is_file()]
    if osf:
        report.layouts.append("vqa-rad-osf")
        if len(osf) > 1:
            report.note(f"both {OSF_NAMES[0]!r} and {OSF_NAMES[1]!r} found: read {osf[0].name!r}")
        if (root / "trainset.json").is_file():
            report.note("trainset.json / testset.json ignored: the OSF json is read")
        yield from _osf(root, osf[0], opts, report)
        return
    if (root / "trainset.json").is_file() or (root / "testset.json").is_file():
        report.layouts.append("vqa-rad-mevf")
        yield from _mevf(root, opts, report)
        return
    raise FileNotFoundError(f"root: expected {OSF_NAMES[0]!r} (or {OSF_NAMES[1]!r}, or MEVF's trainset.json / "
                            f"testset.json) in {root}")
