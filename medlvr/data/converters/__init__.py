"""`medlvr convert`: benchmark releases, as they come, -> the medlvr JSONL format (medlvr/data/records.py).

One module per benchmark, each naming the layouts it reads and where they come from (the full
table, with sources and published counts, is in docs/data.md):

=================  ==================================================================================
dataset            layouts
=================  ==================================================================================
``slake``          slake-json (official train/validate/test.json), slake-csv (PMC-VQA's test csvs)
``vqa-rad``        vqa-rad-osf (``VQA_RAD Dataset Public.json`` / ``VQA_RAD_Dataset_Public.json``),
                   vqa-rad-mevf (``trainset.json`` / ``testset.json``)
``pathvqa``        pathvqa-qa-pkl, pathvqa-vqa-pkl, pathvqa-lxmert-json
``omnimedvqa``     omnimedvqa-official (``QA_information/Open-access`` [+ Restricted-access])
``pmc-vqa``        pmc-vqa-v1 (train.csv / test_clean.csv), pmc-vqa-v2 (train_2.csv / test_2.csv)
``mmmu-med``       mmmu-hf-parquet (the five Health & Medicine subjects)
``medxpertqa-mm``  medxpertqa-hf (MM/test.jsonl, MM/dev.jsonl), medxpertqa-eval
=================  ==================================================================================

Bad source entries (a missing image, an empty answer, an answer that is not among the options,
a label that names no choice, ...) are skipped, and each is listed with its file, entry number
and reason in the printed summary and in ``<out stem>.report.json`` beside the output; with
``strict=True`` (``--strict``) the first one raises DataError and nothing is written. Entries
left out by design (SLAKE's Chinese questions, MMMU's unanswered test questions) are counted as
filtered, exact duplicate (split, image, question, answer) entries are listed as duplicates
(PathVQA's are dropped unless ``keep_duplicates``).

Images may be anything medlvr/imageio/reader.py reads (PNG/JPEG, DICOM, NIfTI, 16-bit TIFF);
``window`` names the windowing preset written into every record.
"""
from __future__ import annotations

from pathlib import Path

from . import medxpertqa, mmmu, omnimedvqa, pathvqa, pmc_vqa, slake, vqa_rad
from ._base import Bad, ConvertReport, Duplicate, Options, Skipped, report_path, run
from .slake import matched_labels as slake_matched_labels

_MODULES = {m.NAME: m for m in (omnimedvqa, vqa_rad, slake, pathvqa, pmc_vqa, mmmu, medxpertqa)}
DATASETS = tuple(_MODULES)


def convert(dataset: str, root, out, *, strict: bool = False, skip_bad: bool | None = None,
            split_fractions=None, restricted: bool = False, slake_roi: str = "question",
            vqa_rad_frames: str = "train", keep_duplicates: bool = False, pmc_vqa_version: str = "auto",
            pmc_vqa_test: str = "clean", answers=None, window: str | None = None) -> ConvertReport:
    """Convert ``dataset`` found under ``root`` into the JSONL file ``out``; returns the report
    (also written to ``<out stem>.report.json``).

    strict: fail (DataError naming file, entry and field of the first bad entry; nothing written)
    instead of skipping and reporting bad entries. ``skip_bad`` is the old name of the opposite:
    ``skip_bad=True`` is the default now, ``skip_bad=False`` means ``strict=True``.
    window: a preset or "W/L" pair written into every record (medlvr/imageio/windowing.py).
    """
    if dataset not in _MODULES:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if skip_bad is not None:
        if skip_bad and strict:
            raise ValueError("skip_bad=True and strict=True contradict each other (skipping is the default)")
        strict = strict or not skip_bad
    if slake_roi not in ("question", "all", "none"):
        raise ValueError(f"slake_roi: expected 'question', 'all' or 'none', got {slake_roi!r}")
    if vqa_rad_frames not in ("train", "none"):
        raise ValueError(f"vqa_rad_frames: expected 'train' or 'none', got {vqa_rad_frames!r}")
    if str(pmc_vqa_version) not in ("auto", "1", "2"):
        raise ValueError(f"pmc_vqa_version: expected 'auto', '1' or '2', got {pmc_vqa_version!r}")
    if pmc_vqa_test not in ("clean", "full"):
        raise ValueError(f"pmc_vqa_test: expected 'clean' or 'full', got {pmc_vqa_test!r}")
    if split_fractions is not None:
        if len(split_fractions) != 3 or any(x < 0 for x in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions: expected 3 non-negative fractions summing to 1, got {split_fractions!r}")
        split_fractions = tuple(float(x) for x in split_fractions)
    out = Path(out)
    out_dir = out.resolve().parent
    opts = Options(split_fractions=split_fractions, restricted=restricted, slake_roi=slake_roi,
                   vqa_rad_frames=vqa_rad_frames, keep_duplicates=keep_duplicates,
                   pmc_vqa_version=str(pmc_vqa_version), pmc_vqa_test=pmc_vqa_test,
                   answers=str(answers) if answers else None, image_dir=out_dir / f"{out.stem}_images")
    summary = {"strict": strict, "window": window}
    summary.update({"omnimedvqa": {"restricted": restricted, "split_fractions": split_fractions},
                    "slake": {"slake_roi": slake_roi}, "vqa-rad": {"vqa_rad_frames": vqa_rad_frames},
                    "pathvqa": {"keep_duplicates": keep_duplicates},
                    "pmc-vqa": {"pmc_vqa_version": str(pmc_vqa_version), "pmc_vqa_test": pmc_vqa_test},
                    "mmmu-med": {"answers": opts.answers}}.get(dataset, {}))
    mod = _MODULES[dataset]
    return run(dataset, mod.read, mod.DROP_DUPLICATES, root, out, opts, strict=strict, window=window,
               option_summary=summary)


__all__ = ["convert", "DATASETS", "ConvertReport", "Skipped", "Duplicate", "Bad", "Options", "report_path",
           "slake_matched_labels"]
