"""`medlvr synth`: a deterministic synthetic medical VQA set in the medlvr JSONL format.

Each record is one radiograph-like image and one question about its lesion:

- image: smooth noise, a bright body-like ellipse, curved rib-like stripes, fine noise; then
  zero or one lesion (round / oval / irregular / square, small / large, brighter than its
  surroundings by a contrast that depends on the difficulty, centred inside one quadrant).
- question types (`qtype`): presence (yes/no), location (4 quadrants, multiple choice; a third
  of them as yes/no "Is the lesion in the upper left?"), size (small / large, multiple choice),
  shape (4 shapes, multiple choice; always a large lesion). Every answer is decided by the
  lesion's pixels, so a model that attends to the lesion region can answer it.
- ROI: the lesion's bounding box (pixels of the image, x1/y1 exclusive) on a `roi_fraction`
  of the records that have a lesion; records without a lesion never carry an ROI.

Record i is drawn from its own RNG, numpy.random.default_rng([seed, i]), so the set is
byte-identical for a seed, and the first n records do not depend on the requested total.

`image_format="dicom"` (`--format dicom`) writes each image as a CT-like DICOM file instead of
a PNG (see `_write_ct`): HU values with rescale tags and a window that maps them back to the
PNG's 8-bit values exactly, so the DICOM set reads as the same pixels through the DICOM path.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medlvr.imageio.errors import require
from medlvr.data.records import ROI, Record, write_jsonl

QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
SHAPES = ("round", "oval", "irregular", "square")
SIZES = ("small", "large")
QTYPES = ("presence", "location", "size", "shape")
IMAGE_FORMATS = ("png", "dicom")

# CT-like DICOM: 8-bit value v -> HU = 8 v - 1000 (-1000 air .. +1040 dense bone), stored as
# HU + 1024 (12 bits) with RescaleSlope 1, RescaleIntercept -1024. The file's own LINEAR window
# (PS3.3 C.11.2.1.2), centre 20.5 and width 2041, gives ((HU - 20) / 2040 + 0.5) = v / 255, so
# the reader's 8-bit output is v again.
CT_HU_PER_LEVEL, CT_HU_OFFSET, CT_INTERCEPT = 8, -1000, -1024
CT_WINDOW = (20.5, 2041.0)


@dataclass(frozen=True)
class Difficulty:
    contrast: tuple[float, float]     # lesion brightness above its surroundings (image in [0, 1])
    small_r: tuple[float, float]      # lesion "radius" as a fraction of the image side
    large_r: tuple[float, float]
    noise: float                      # std of the fine pixel noise
    ribs: float                       # amplitude of the rib-like stripes
    edge: float                       # soft edge width in pixels


DIFFICULTIES = {
    # Large, bright, well separated: a ~1M-parameter model learns it in minutes on a CPU.
    "easy": Difficulty(contrast=(0.45, 0.6), small_r=(0.07, 0.09), large_r=(0.17, 0.21), noise=0.02, ribs=0.06, edge=1.0),
    "medium": Difficulty(contrast=(0.25, 0.4), small_r=(0.06, 0.09), large_r=(0.13, 0.18), noise=0.04, ribs=0.10, edge=1.5),
    "hard": Difficulty(contrast=(0.12, 0.22), small_r=(0.05, 0.08), large_r=(0.10, 0.14), noise=0.06, ribs=0.14, edge=2.0),
}


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a cells x cells grid upsampled bicubically, values ~[0, 1]."""
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(low, mode="L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng, size: int, d: Difficulty) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.12 + 0.10 * _smooth_noise(rng, size, 6)
    # Body: a soft bright ellipse roughly centred.
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
    ax, ay = rng.uniform(0.40, 0.47), rng.uniform(0.43, 0.49)
    r = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    body = 1.0 / (1.0 + np.exp((r - 1.0) * 12.0))
    img = img + 0.25 * body
    # Ribs: stripes bending away from the midline, only inside the body.
    period = rng.uniform(0.09, 0.13)
    bend = rng.uniform(0.6, 1.2)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * (yy + bend * (xx - cx) ** 2) / period + phase)
    img = img + d.ribs * stripes * body
    img = img + d.noise * rng.standard_normal((size, size)).astype(np.float32)
    return img


# Largest distance from the centre to the lesion's edge, in units of its radius, per shape:
# oval: sqrt(max elongation 2.0); irregular: 1 + sum of the max harmonic amplitudes (3 x 0.2);
# square: half-diagonal of the square with the disc's area.
_REACH = {"round": 1.0, "oval": math.sqrt(2.0), "irregular": 1.6, "square": math.sqrt(math.pi / 2)}


def _lesion_mask(rng, size: int, shape: str, radius: float, cx: float, cy: float, edge: float) -> np.ndarray:
    """Soft mask in [0, 1] of a lesion centred at (cx, cy) pixels with characteristic `radius` pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    if shape == "round":
        dist = np.sqrt(dx * dx + dy * dy) - radius
    elif shape == "oval":
        # Elongation 1.7-2.0 at a random angle; same area as a disc of `radius`.
        e = rng.uniform(1.7, 2.0)
        t = rng.uniform(0, math.pi)
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        a, b = radius * math.sqrt(e), radius / math.sqrt(e)
        dist = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)
    elif shape == "irregular":
        theta = np.arctan2(dy, dx)
        rr = np.ones_like(theta)
        for k in (3, 4, 5):
            rr = rr + rng.uniform(0.12, 0.2) * np.sin(k * theta + rng.uniform(0, 2 * math.pi))
        dist = np.sqrt(dx * dx + dy * dy) - radius * rr
    elif shape == "square":
        # Axis-aligned square of the disc's area, corners slightly rounded by the soft edge.
        half = radius * math.sqrt(math.pi) / 2
        dist = np.maximum(np.abs(dx), np.abs(dy)) - half
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    return np.clip(0.5 - dist / (2 * edge), 0.0, 1.0)


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask >= 0.5)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _question(rng, qtype: str, lesion: dict | None) -> tuple[str, list[str] | None, str]:
    """(question, options or None, answer) for a question type; lesion is None when absent."""
    if qtype == "presence":
        q = ["Is there a lesion in this image?", "Is a lesion present?", "Is there an abnormality in the image?"][rng.integers(3)]
        return q, None, "yes" if lesion else "no"
    assert lesion is not None
    if qtype == "location":
        if rng.random() < 1 / 3:
            # Half "yes": ask the true quadrant, else one of the three others.
            others = [q for q in QUADRANTS if q != lesion["quadrant"]]
            asked = lesion["quadrant"] if rng.random() < 0.5 else others[rng.integers(3)]
            return f"Is the lesion in the {asked} of the image?", None, "yes" if asked == lesion["quadrant"] else "no"
        q = ["Where is the lesion located?", "In which quadrant is the lesion?"][rng.integers(2)]
        return q, [QUADRANTS[i] for i in rng.permutation(4)], lesion["quadrant"]
    if qtype == "size":
        q = ["How large is the lesion?", "Is the lesion small or large?"][rng.integers(2)]
        return q, [SIZES[i] for i in rng.permutation(2)], lesion["size"]
    if qtype == "shape":
        q = ["What is the shape of the lesion?", "Which shape best describes the lesion?"][rng.integers(2)]
        return q, [SHAPES[i] for i in rng.permutation(4)], lesion["shape"]
    raise ValueError(f"qtype: expected one of {QTYPES}, got {qtype!r}")


def make_record(i: int, *, seed: int, image_size: int, difficulty: str, roi_fraction: float,
                qtypes: tuple[str, ...] = QTYPES) -> tuple[np.ndarray, dict, str, list[str] | None, str, list[ROI]]:
    """Draw record i: (uint8 image, lesion dict or None, question, options, answer, rois)."""
    d = DIFFICULTIES[difficulty]
    rng = np.random.default_rng([seed, i])
    qtype = qtypes[i % len(qtypes)]  # balanced types
    present = True if qtype != "presence" else bool(rng.random() < 0.5)
    img = _background(rng, image_size, d)
    lesion = None
    if present:
        shape = SHAPES[rng.integers(4)]
        size = SIZES[rng.integers(2)]
        if qtype == "shape":
            # A small lesion spans about one 14-px patch, where the four shapes look alike;
            # shape questions get large lesions so that their answer is decidable from the pixels.
            size = "large"
        lo, hi = d.small_r if size == "small" else d.large_r
        radius = rng.uniform(lo, hi) * image_size
        quadrant = QUADRANTS[rng.integers(4)]
        # Centre inside the quadrant, at least 10% of the side from the midlines (the quadrant
        # answer is unambiguous) and far enough from the border that the whole lesion is in the
        # frame (its ROI box is not cut). `reach` bounds the lesion's extent from its centre.
        reach = radius * _REACH[shape] + 2 * d.edge + 1

        def coord(upper: bool) -> float:
            lo_c, hi_c = reach, 0.4 * image_size
            c = rng.uniform(lo_c, hi_c) if hi_c > lo_c else lo_c
            return c if upper else image_size - c
        cx = coord(quadrant.endswith("left"))
        cy = coord(quadrant.startswith("upper"))
        mask = _lesion_mask(rng, image_size, shape, radius, cx, cy, d.edge)
        contrast = rng.uniform(*d.contrast)
        img = img + contrast * mask
        lesion = dict(shape=shape, size=size, quadrant=quadrant, box=_bbox(mask))
    question, options, answer = _question(rng, qtype, lesion)
    rois = []
    if lesion is not None and rng.random() < roi_fraction:
        rois = [ROI(image=0, box=lesion["box"])]
    pixels = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return pixels, lesion, question, options, answer, rois


def _write_ct(path: Path, pixels: np.ndarray, *, seed: int, i: int) -> None:
    """The 8-bit image as a CT slice in HU (see CT_WINDOW); UIDs derived from (seed, i)."""
    from medlvr.imageio.dicom_write import write_dicom

    hu = pixels.astype(np.int32) * CT_HU_PER_LEVEL + CT_HU_OFFSET
    write_dicom(path, (hu - CT_INTERCEPT).astype(np.uint16), modality="CT", rescale=(1.0, CT_INTERCEPT),
                window=CT_WINDOW, bits_stored=12, instance_number=i + 1, uid_seed=("medlvr-synth", seed, i))


def synthesize(out_dir, *, n: int = 800, seed: int = 0, roi_fraction: float = 0.5, image_size: int = 112,
               difficulty: str = "easy", split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
               qtypes: tuple[str, ...] = QTYPES, image_format: str = "png") -> dict[str, Path]:
    """Write out_dir/images/*.png (or *.dcm) and out_dir/{train,val,test}.jsonl; returns the JSONL paths.

    Records [0, n*f_train) are train, the next n*f_val val, the rest test.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if not 0.0 <= roi_fraction <= 1.0:
        raise ValueError(f"roi_fraction: expected a value in [0, 1], got {roi_fraction!r}")
    if not isinstance(image_size, int) or image_size < 56:
        raise ValueError(f"image_size: expected an int >= 56 (pixels), got {image_size!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {tuple(DIFFICULTIES)}, got {difficulty!r}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions: expected 3 non-negative fractions summing to 1, got {split_fractions!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
    bad = [q for q in qtypes if q not in QTYPES]
    if not qtypes or bad:
        raise ValueError(f"qtypes: expected a non-empty subset of {QTYPES}, got {qtypes!r}")
    if image_format == "dicom":  # before anything is written: no half-made images/ folder
        require("pydicom", "image_format='dicom' (synthetic CT slices)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_train = int(round(n * split_fractions[0]))
    n_val = int(round(n * split_fractions[1]))
    by_split: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    width = max(6, len(str(n - 1)))
    for i in range(n):
        pixels, _lesion, question, options, answer, rois = make_record(
            i, seed=seed, image_size=image_size, difficulty=difficulty, roi_fraction=roi_fraction, qtypes=qtypes)
        rid = f"synth-{i:0{width}d}"
        if image_format == "dicom":
            path = out / "images" / f"{rid}.dcm"
            _write_ct(path, pixels, seed=seed, i=i)
        else:
            path = out / "images" / f"{rid}.png"
            Image.fromarray(pixels, mode="L").save(path, format="PNG", optimize=False)
        split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
        by_split[split].append(Record(id=rid, images=[str(path)], question=question, options=options,
                                      answer=answer, rois=rois, split=split, source="synth",
                                      qtype=QTYPES[QTYPES.index(qtypes[i % len(qtypes)])]))
    paths = {}
    for split, recs in by_split.items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], recs)
    meta = dict(n=n, seed=seed, roi_fraction=roi_fraction, image_size=image_size, difficulty=difficulty,
                split_fractions=list(split_fractions), qtypes=list(qtypes), format=image_format,
                counts={k: len(v) for k, v in by_split.items()})
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths
