"""Converters from the published layouts (fixtures in tests/data/fixtures/<dataset>/)."""
import argparse
from pathlib import Path

import pytest

from medlvr.cli.convert import add_arguments as add_convert_arguments, run as convert_main
from medlvr.data.converters import convert
from medlvr.data.records import DataError, load_jsonl

FIX = Path(__file__).parent / "fixtures"


def _load(path):
    recs, rep = load_jsonl(path)
    assert rep.n_bad == 0
    return {r.id: r for r in recs}


def test_omnimedvqa_options_modality_quirk_and_bad_answer(tmp_path):
    with pytest.raises(DataError) as e:
        convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "o.jsonl")
    assert e.value.file.endswith("RadImageNet.json") and (e.value.line, e.value.field) == (2, "answer")
    rep = convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "o.jsonl", skip_bad=True)
    assert rep.total == 4 and rep.n_bad == 1 and rep.counts == {"test": 3}
    recs = _load(tmp_path / "o.jsonl")
    r = recs["omnimedvqa-Chest CT Scan_0000"]
    assert r.options == ["Squamous cell carcinoma", "Adenocarcinoma", "Large cell carcinoma", "Normal"]
    assert r.answer == "Adenocarcinoma" and r.qtype == "Disease Diagnosis" and r.source == "omnimedvqa/Chest CT Scan"
    assert Path(r.images[0]).is_file()
    # The entry spelled "modality" (a known quirk of Chest CT Scan.json) converts too.
    assert recs["omnimedvqa-Chest CT Scan_0001"].options == ["MRI", "CT"]
    # Hash split keeps all questions of an image in one split, deterministically.
    convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "h.jsonl", skip_bad=True, split_fractions=(0.5, 0.0, 0.5))
    a = _load(tmp_path / "h.jsonl")
    assert a["omnimedvqa-Chest CT Scan_0000"].split == a["omnimedvqa-Chest CT Scan_0001"].split
    convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "h2.jsonl", skip_bad=True, split_fractions=(0.5, 0.0, 0.5))
    assert (tmp_path / "h.jsonl").read_text() == (tmp_path / "h2.jsonl").read_text()


def test_vqa_rad_splits_numeric_answers_and_missing_image(tmp_path):
    with pytest.raises(DataError) as e:
        convert("vqa-rad", FIX / "vqa_rad", tmp_path / "v.jsonl")
    assert (e.value.line, e.value.field) == (4, "images[0]") and "synpic99999" in str(e.value)
    rep = convert("vqa-rad", FIX / "vqa_rad", tmp_path / "v.jsonl", skip_bad=True)
    assert rep.counts == {"train": 2, "test": 1} and rep.n_bad == 1
    recs = _load(tmp_path / "v.jsonl")
    assert recs["vqa-rad-0"].answer == "Yes" and recs["vqa-rad-0"].split == "train" and recs["vqa-rad-0"].qtype == "PRES"
    assert recs["vqa-rad-1"].answer == "2" and recs["vqa-rad-1"].split == "test"
    assert recs["vqa-rad-2"].split == "train"  # "para" rephrasings of training questions stay train


def test_slake_english_only_rois_from_detection_json(tmp_path):
    rep = convert("slake", FIX / "slake", tmp_path / "s.jsonl", skip_bad=True)
    assert rep.filtered == 1  # the zh question
    assert rep.counts == {"train": 2, "val": 1, "test": 1} and rep.n_bad == 1
    assert rep.skipped[0][1:3] == (2, "answer")
    recs = _load(tmp_path / "s.jsonl")
    # "Where is the liver?" -> the Liver box [x, y, w, h] = [10, 12, 30, 20] as x0 y0 x1 y1.
    assert [r.box for r in recs["slake-1"].rois] == [(10.0, 12.0, 40.0, 32.0)]
    # The Spleen box [40, 30, 30, 20] overhangs the 64x64 image: clipped and counted.
    assert [r.box for r in recs["slake-3"].rois] == [(40.0, 30.0, 64.0, 50.0)] and rep.boxes_clipped == 1
    assert recs["slake-4"].rois == [] and recs["slake-4"].split == "val"
    assert recs["slake-5"].qtype == "Abnormality"
    convert("slake", FIX / "slake", tmp_path / "all.jsonl", skip_bad=True, slake_roi="all")
    assert len(_load(tmp_path / "all.jsonl")["slake-1"].rois) == 2
    convert("slake", FIX / "slake", tmp_path / "none.jsonl", skip_bad=True, slake_roi="none")
    assert not any(r.rois for r in _load(tmp_path / "none.jsonl").values())


def test_pathvqa_pickle_and_json(tmp_path):
    rep = convert("pathvqa", FIX / "pathvqa", tmp_path / "p.jsonl", skip_bad=True)
    assert rep.counts == {"train": 2, "val": 1, "test": 1} and rep.n_bad == 1
    recs = _load(tmp_path / "p.jsonl")
    assert recs["pathvqa-train-1"].answer == "cirrhosis" and recs["pathvqa-train-2"].qtype == "yes/no"
    assert recs["pathvqa-val-1"].images[0].endswith("images/val/val_0001.jpg")


def test_cli_and_bad_arguments(tmp_path, capsys):
    ap = add_convert_arguments(argparse.ArgumentParser())
    args = ap.parse_args(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "s.jsonl"), "--skip-bad"])
    assert convert_main(args) == 0
    out = capsys.readouterr().out
    assert "4 records" in out and "test.json:2: field 'answer'" in out
    args = ap.parse_args(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "t.jsonl")])
    assert convert_main(args) == 2
    assert "test.json:2: field 'answer'" in capsys.readouterr().err and not (tmp_path / "t.jsonl").exists()
    with pytest.raises(ValueError, match="dataset"):
        convert("mimic", FIX, tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="VQA_RAD"):
        convert("vqa-rad", FIX / "slake", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="split_fractions"):
        convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "x.jsonl", split_fractions=(0.5, 0.5, 0.5))
