"""``medlvr convert``: a published dataset layout to medlvr's JSONL (medlvr/data/converters.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from medlvr.data.converters import DATASETS, convert
from medlvr.data.records import DataError
from medlvr.imageio import window_arg

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dataset", choices=DATASETS, help="source layout")
    parser.add_argument("--root", required=True, type=Path, help="directory of the downloaded dataset")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL file")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad source entries (each is counted and listed) instead of stopping at the first")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                        help="omnimedvqa only: hash-split images into train/val/test (default: all test)")
    parser.add_argument("--slake-roi", choices=("question", "all", "none"), default="question",
                        help="slake: attach detection boxes whose label the question/answer names (default), all, none")
    parser.add_argument("--window", type=window_arg, default=None,
                        help="windowing for DICOM/NIfTI images without their own window: lung, mediastinum, "
                             "abdomen, bone, brain or 'W/L' (e.g. 1500/-600); written into every record")
    return parser


def run(args) -> int:
    """CLI body: prints the report; a bad entry without --skip-bad prints where and returns 2."""
    import sys

    try:
        report = convert(args.dataset, args.root, args.out, skip_bad=args.skip_bad,
                         split_fractions=tuple(args.split_fractions) if args.split_fractions else None,
                         slake_roi=args.slake_roi, window=args.window)
    except DataError as e:
        print(f"error: {e}\n(nothing written; rerun with --skip-bad to skip and list bad entries)", file=sys.stderr)
        return 2
    print(report)
    return 0 if sum(report.counts.values()) > 0 else 1

