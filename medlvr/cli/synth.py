"""``medlvr synth``: write the deterministic synthetic medical VQA set (medlvr/data/synth.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medlvr.data.synth import DIFFICULTIES, IMAGE_FORMATS, QTYPES, synthesize

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, type=Path, help="output directory (images/ + train/val/test.jsonl)")
    parser.add_argument("--n", type=int, default=800, help="number of records (default 800)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images, questions and ROI draws (default 0)")
    parser.add_argument("--roi-fraction", type=float, default=0.5,
                        help="fraction of records with a lesion that carry its ROI box (default 0.5)")
    parser.add_argument("--image-size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="easy",
                        help="lesion contrast, radius range, noise and rib texture: easy, medium, hard (default easy)")
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions (default 0.8 0.1 0.1)")
    parser.add_argument("--qtypes", nargs="+", choices=QTYPES, default=list(QTYPES),
                        help="question types, cycled over the records (default: all)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="png", dest="image_format",
                        help="png (default) or dicom: CT-like DICOM slices in HU with rescale and window tags")
    return parser


def run(args) -> int:
    paths = synthesize(args.out, n=args.n, seed=args.seed, roi_fraction=args.roi_fraction,
                       image_size=args.image_size, difficulty=args.difficulty,
                       split_fractions=tuple(args.split), qtypes=tuple(args.qtypes),
                       image_format=getattr(args, "image_format", "png"))
    meta = json.loads((Path(args.out) / "meta.json").read_text())
    print(f"wrote {args.n} records to {args.out} " +
          ", ".join(f"{k}: {meta['counts'][k]} ({p.name})" for k, p in paths.items()))
    return 0

