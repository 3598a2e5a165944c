"""OmniMedVQA (Hu et al., CVPR 2024): multiple-choice questions over 73 medical image datasets.

Layout ``omnimedvqa-official`` (OmniMedVQA.zip from OpenGVLab, via openxlab or the Hugging Face
mirror foreverbeliever/OmniMedVQA; the loaders in OpenGVLab/Multi-Modality-Arena ``MedicalEval/``
read it), paths relative to --root or to an ``OmniMedVQA/`` folder inside it:
``QA_information/Open-access/<dataset>.json`` (42 files, 88,996 questions) and
``QA_information/Restricted-access/<dataset>.json``, each a list of {question_id, dataset,
question_type, modality_type (``Chest CT Scan.json`` spells it "modality"), question, gt_answer,
option_A .. option_D, image_path}. ``image_path`` is relative to the root: ``Images/<dataset>/...``
for open access; for restricted access it points into the original dataset, which you download
yourself under its own licence.

By default only Open-access is read (what MedEvalKit evaluates); ``--restricted`` adds
Restricted-access. A question whose image is not there is a reported bad entry, never an abort.
A benchmark without official splits: every record is "test" unless ``--split-fractions`` asks
for a deterministic per-image hash split.
"""
from __future__ import annotations

from pathlib import Path

from ._base import ConvertReport, Options, find_root, hash_split, objects, read_json_list, text

NAME = "omnimedvqa"
DROP_DUPLICATES = False
_LETTERS = "ABCDEF"


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, ["QA_information"], ["OmniMedVQA"])
    qa_dir = root / "QA_information"
    subs = ["Open-access"] + (["Restricted-access"] if opts.restricted else [])
    files = [(sub, p) for sub in subs for p in sorted((qa_dir / sub).glob("*.json"))]
    if not opts.restricted and (qa_dir / "Restricted-access").is_dir():
        n = len(list((qa_dir / "Restricted-access").glob("*.json")))
        report.note(f"QA_information/Restricted-access ({n} files) not read: pass --restricted to include it")
    if opts.restricted and not (qa_dir / "Restricted-access").is_dir():
        report.note("--restricted: no QA_information/Restricted-access folder")
    if not any(sub == "Open-access" for sub, _ in files) and not opts.restricted:
        raise FileNotFoundError(f"root: no QA_information/Open-access/*.json under {root}")
    if not files:
        raise FileNotFoundError(f"root: no QA_information/{{{','.join(subs)}}}/*.json under {root}")
    report.layouts.append("omnimedvqa-official")
    for sub, f in files:
        access = "open" if sub == "Open-access" else "restricted"
        def one(e, i, f=f, access=access):
            options = [text(e[f"option_{k}"]) for k in _LETTERS if text(e.get(f"option_{k}"))]
            img = text(e.get("image_path"))
            ds = text(e.get("dataset")) or f.stem
            yield {
                "id": f"omnimedvqa-{text(e.get('question_id')) or f'{ds}-{i}'}",
                "images": [str(root / img)] if img else [],
                "question": text(e.get("question")), "answer": text(e.get("gt_answer")),
                "options": options or None,
                "split": hash_split(img, opts.split_fractions) if opts.split_fractions else "test",
                "source": f"omnimedvqa/{ds}", "qtype": text(e.get("question_type")), "answer_type": "closed",
                "modality": text(e.get("modality_type") or e.get("modality")),
                "meta": {"dataset": ds, "access": access},
            }

        yield from objects(f, read_json_list, one)
