"""`medlvr synth`: deterministic, valid, answers decided by the lesion, ROI on the asked fraction."""
import argparse
import hashlib

import numpy as np
import pytest
from PIL import Image

from medlvr.data.records import load_jsonl
from medlvr.cli.synth import add_arguments as add_synth_arguments, run as synth_main
from medlvr.data.synth import QUADRANTS, synthesize


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _all(root):
    recs = []
    for split in ("train", "val", "test"):
        r, rep = load_jsonl(root / f"{split}.jsonl")
        assert rep.n_bad == 0
        recs += r
    return recs


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, n=16, seed=3)
    synthesize(b, n=16, seed=3)
    synthesize(c, n=16, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_records_are_valid_balanced_and_answerable(tmp_path):
    synthesize(tmp_path, n=80, seed=0, roi_fraction=1.0)
    recs = _all(tmp_path)
    assert len(recs) == 80 and sum(r.split == "train" for r in recs) == 64
    assert {r.qtype for r in recs} == {"presence", "location", "size", "shape"}
    for r in recs:
        img = np.asarray(Image.open(r.images[0]), dtype=np.float32)
        assert img.shape == (112, 112)
        has_lesion = not (r.qtype == "presence" and r.answer == "no")
        # roi_fraction=1: every lesion has its box, an absent lesion never has one.
        assert bool(r.rois) == has_lesion
        if not has_lesion:
            continue
        x0, y0, x1, y1 = (int(v) for v in r.rois[0].box)
        inside = img[y0:y1, x0:x1]
        # The lesion makes its box brighter than the image as a whole.
        assert inside.mean() > img.mean() + 20, r.id
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        quadrant = ("upper" if cy < 56 else "lower") + " " + ("left" if cx < 56 else "right")
        if r.qtype == "location" and r.options:
            assert r.answer == quadrant and sorted(r.options) == sorted(QUADRANTS)
        if r.qtype == "location" and not r.options:
            asked = r.question.split("in the ")[1].split(" of")[0]
            assert r.answer == ("yes" if asked == quadrant else "no")
        if r.qtype == "size":
            area = (x1 - x0) * (y1 - y0)
            assert (area > 30 * 30) == (r.answer == "large"), (r.id, area)


def test_roi_fraction_and_difficulty_knobs(tmp_path):
    synthesize(tmp_path / "none", n=24, seed=1, roi_fraction=0.0)
    assert not any(r.rois for r in _all(tmp_path / "none"))
    synthesize(tmp_path / "half", n=200, seed=1, roi_fraction=0.5, qtypes=("shape",))
    frac = np.mean([bool(r.rois) for r in _all(tmp_path / "half")])
    assert 0.35 < frac < 0.65
    synthesize(tmp_path / "hard", n=8, seed=1, difficulty="hard", image_size=96, qtypes=("size",))
    recs = _all(tmp_path / "hard")
    assert Image.open(recs[0].images[0]).size == (96, 96)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="roi_fraction"):
        synthesize(tmp_path, n=4, roi_fraction=1.5)
    with pytest.raises(ValueError, match="difficulty"):
        synthesize(tmp_path, n=4, difficulty="extreme")
    with pytest.raises(ValueError, match="n:"):
        synthesize(tmp_path, n=0)


def test_cli_entry(tmp_path, capsys):
    args = add_synth_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path), "--n", "10", "--seed", "2", "--roi-fraction", "0.3"])
    assert synth_main(args) == 0
    assert "train: 8" in capsys.readouterr().out
    assert (tmp_path / "meta.json").is_file()
