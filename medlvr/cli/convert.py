"""``medlvr convert``: a benchmark release, as it comes, to medlvr's JSONL (medlvr/data/converters/)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medlvr.data.converters import DATASETS, convert
from medlvr.data.records import DataError
from medlvr.imageio import window_arg

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dataset", choices=DATASETS, help="benchmark (its release layouts: docs/data.md)")
    parser.add_argument("--root", required=True, type=Path, help="directory of the downloaded release")
    parser.add_argument("--out", required=True, type=Path,
                        help="output JSONL file; the report goes beside it as <stem>.report.json")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad source entry and write nothing (default: skip bad entries "
                             "and list each, with file, entry and reason, in the summary and the report)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="accepted for compatibility: skipping and reporting bad entries is the default now")
    parser.add_argument("--window", type=window_arg, default=None,
                        help="windowing for DICOM/NIfTI images without their own window: lung, mediastinum, "
                             "abdomen, bone, brain or 'W/L' (e.g. 1500/-600); written into every record")
    g = parser.add_argument_group("per benchmark")
    g.add_argument("--restricted", action="store_true",
                   help="omnimedvqa: also read QA_information/Restricted-access (default: Open-access only)")
    g.add_argument("--split-fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="omnimedvqa: hash-split images into train/val/test (default: all test)")
    g.add_argument("--slake-roi", choices=("question", "all", "none"), default="question",
                   help="slake: attach the detection boxes the question names (default; rule in docs/data.md), "
                        "all boxes, or none")
    g.add_argument("--vqa-rad-frames", choices=("train", "none"), default="train",
                   help="vqa-rad: add the 1,267 question_frame rephrasings to train (default: the published "
                        "3,515 = 3,064 / 451 split) or leave them out (1,797 / 451)")
    g.add_argument("--keep-duplicates", action="store_true",
                   help="pathvqa: keep exact duplicate (image, question, answer) entries (default: drop and list them)")
    g.add_argument("--pmc-vqa-version", choices=("auto", "1", "2"), default="auto",
                   help="pmc-vqa: v2 (train_2/test_2.csv) when present, else v1 (default), or force one")
    g.add_argument("--pmc-vqa-test", choices=("clean", "full"), default="clean",
                   help="pmc-vqa v1: test split from test_clean.csv (2,000; default) or test.csv (50,000)")
    g.add_argument("--answers", type=Path, default=None,
                   help="mmmu-med: JSON {id: answer} (or MMMU's answer_dict layout) for the withheld test answers")
    return parser


def run(args) -> int:
    """CLI body: prints the summary; 0 when records were written, 1 when none, 2 for --strict
    with a bad entry (printed with where it is; nothing written)."""
    if args.strict and args.skip_bad:
        raise ValueError("--strict and --skip-bad contradict each other (skipping is the default; drop --skip-bad)")
    try:
        report = convert(args.dataset, args.root, args.out, strict=args.strict,
                         split_fractions=tuple(args.split_fractions) if args.split_fractions else None,
                         restricted=args.restricted, slake_roi=args.slake_roi, vqa_rad_frames=args.vqa_rad_frames,
                         keep_duplicates=args.keep_duplicates, pmc_vqa_version=args.pmc_vqa_version,
                         pmc_vqa_test=args.pmc_vqa_test, answers=args.answers, window=args.window)
    except DataError as e:
        print(f"error: {e}\n(--strict: nothing written; without --strict bad entries are skipped and listed)",
              file=sys.stderr)
        return 2
    print(report)
    return 0 if report.written > 0 else 1
