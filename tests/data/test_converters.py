"""Converters on real released entries (fixtures in tests/data/fixtures/<dataset>/, provenance in
each folder's PROVENANCE.md; images are synthetic stand-ins of the datasets' sizes)."""
import argparse
import json
import pickle
import shutil
from pathlib import Path

import pytest

from medlvr.cli.convert import add_arguments as add_convert_arguments, run as convert_main
from medlvr.data.converters import DATASETS, ConvertReport, convert, slake_matched_labels
from medlvr.data.records import DataError, load_jsonl

FIX = Path(__file__).parent / "fixtures"


def _load(path):
    recs, rep = load_jsonl(path)
    assert rep.n_bad == 0
    return {r.id: r for r in recs}


def _report(out):
    return json.loads(Path(out).with_name(Path(out).stem + ".report.json").read_text())


def _cli(argv):
    return convert_main(add_convert_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_datasets():
    assert DATASETS == ("omnimedvqa", "vqa-rad", "slake", "pathvqa", "pmc-vqa", "mmmu-med", "medxpertqa-mm")


# --- SLAKE --------------------------------------------------------------------------------------

def test_slake_release_converts_by_default_and_reports_the_empty_answer(tmp_path):
    out = tmp_path / "s.jsonl"
    rep = convert("slake", FIX / "slake", out)
    # train.json entry 7 is the release's qid 1622 "Does the picture contain liver?" with answer "".
    assert [tuple(s[:4]) for s in rep.skipped] == [(str(FIX / "slake" / "train.json"), 7, "answer", "empty")]
    assert rep.skipped[0].id == "slake-1622"
    assert rep.filtered == 1 and rep.filtered_by == {"q_lang 'zh' (only English is kept)": 1}
    assert rep.counts == {"train": 11, "val": 2, "test": 3} and rep.layouts == ["slake-json"]
    report = _report(out)
    assert report["bad"] == [{"file": str(FIX / "slake" / "train.json"), "entry": 7, "field": "answer",
                              "reason": "empty", "id": "slake-1622"}]
    assert report["counts"] == {"test": 3, "train": 11, "val": 2} and report["written"] == 16
    recs = _load(out)
    r = recs["slake-1623"]  # "Does the picture contain lung?"
    assert isinstance(rep, ConvertReport)
    assert (r.answer_type, r.qtype, r.modality, r.body_part) == ("closed", "Organ", "CT", "Chest_lung")
    assert r.meta == {"base_type": "vqa"} and recs["slake-994"].answer_type == "open"
    with pytest.raises(DataError) as e:
        convert("slake", FIX / "slake", tmp_path / "strict.jsonl", strict=True)
    assert (e.value.line, e.value.field) == (7, "answer") and not (tmp_path / "strict.jsonl").exists()


def _boxes(rec):
    return [r.box for r in rec.rois]


def test_slake_boxes_follow_the_question_not_the_answer(tmp_path):
    convert("slake", FIX / "slake", tmp_path / "s.jsonl")
    recs = _load(tmp_path / "s.jsonl")
    liver, spleen = (60.0, 150.0, 250.0, 320.0), (340.0, 170.0, 430.0, 280.0)
    lkid, rkid = (300.0, 300.0, 370.0, 380.0), (150.0, 300.0, 220.0, 380.0)
    assert _boxes(recs["slake-994"]) == [liver]                      # Where is the liver?
    assert _boxes(recs["slake-995"]) == [lkid, rkid]                 # How many kidneys ...? (plural: both)
    assert _boxes(recs["slake-996"]) == [spleen, lkid]               # ..., left kidney or spleen? (not the right)
    assert _boxes(recs["slake-997"]) == []                           # rightmost organ? -> answer "Spleen" not used
    assert _boxes(recs["slake-1621"]) == []                          # largest organ? -> answer "Lung" not used
    llung, rlung = (560.0, 150.0, 890.0, 770.0), (130.0, 150.0, 460.0, 770.0)
    assert _boxes(recs["slake-1829"]) == [llung]                     # ... the patient's left lung?
    assert _boxes(recs["slake-1830"]) == [rlung]
    assert _boxes(recs["slake-1833"]) == [llung, rlung]              # How many lungs ...? "lungs" -> "Left/Right Lung"
    assert _boxes(recs["slake-11944"]) == [(40.0, 100.0, 470.0, 400.0)]  # "image,lung,liver": punctuation
    assert recs["slake-9844"].rois == []                             # no detection.json next to xmlab0
    convert("slake", FIX / "slake", tmp_path / "all.jsonl", slake_roi="all")
    assert len(_load(tmp_path / "all.jsonl")["slake-994"].rois) == 5
    convert("slake", FIX / "slake", tmp_path / "none.jsonl", slake_roi="none")
    assert not any(r.rois for r in _load(tmp_path / "none.jsonl").values())


@pytest.mark.parametrize("question,labels,want", [
    ("Where is the liver?", ["Liver", "Spleen"], ["Liver"]),
    ("Are the LUNGS clear?", ["Lung", "Heart"], ["Lung"]),                       # plural and case
    ("How many lungs are shown?", ["Lung", "Left Lung", "Right Lung"], ["Lung", "Left Lung", "Right Lung"]),
    ("Where is the left lung?", ["Lung", "Left Lung", "Right Lung"], ["Left Lung"]),  # longest match wins
    ("Which lung is abnormal?", ["Left Lung", "Right Lung"], ["Left Lung", "Right Lung"]),
    ("Which lung is abnormal?", ["Lung", "Left Lung", "Right Lung"], ["Lung"]),
    ("Where is the small bowel?", ["Small_Bowel", "Colon"], ["Small_Bowel"]),     # multiword, underscore
    ("Is there brain edema?", ["Brain Edema", "Brain Non-enhancing Tumor"], ["Brain Edema"]),
    ("Where are the arteries?", ["Artery"], ["Artery"]),                         # -ies plural
    ("Is the pancreas normal?", ["Pancreas"], ["Pancreas"]),                     # singular ending in -s
    ("Is the liver normal?", ["Lung"], []),
    ("What is the organ on the left?", ["Left Lung", "Liver"], []),             # "left" alone names no organ
])
def test_slake_label_rule(question, labels, want):
    assert [labels[i] for i in slake_matched_labels(question, labels)] == want


def test_slake_csv_layout_keeps_answer_type_from_file(tmp_path):
    rep = convert("slake", FIX / "slake_csv", tmp_path / "c.jsonl")
    assert rep.layouts == ["slake-csv"] and rep.counts == {"test": 6} and rep.n_bad == 0
    recs = list(_load(tmp_path / "c.jsonl").values())
    assert sorted(r.answer_type for r in recs) == ["closed"] * 3 + ["open"] * 3


# --- VQA-RAD ------------------------------------------------------------------------------------

def test_vqa_rad_osf_mirror_name_answer_type_frames_and_missing_image(tmp_path):
    out = tmp_path / "v.jsonl"
    rep = convert("vqa-rad", FIX / "vqa_rad", out)
    assert rep.layouts == ["vqa-rad-osf"]
    # 6 source questions + 3 question_frame rephrasings; entry 6's image (synpic35191.jpg) is absent.
    assert rep.total == 9 and rep.counts == {"train": 6, "test": 2}
    assert [(s.entry, s.field) for s in rep.skipped] == [(6, "images[0]")] and "synpic35191" in rep.skipped[0].reason
    recs = _load(out)
    assert recs["vqa-rad-0"].answer_type == "closed" and recs["vqa-rad-0"].qtype == "PRES"
    assert recs["vqa-rad-0"].body_part == "HEAD" and recs["vqa-rad-0"].meta == {"phrase_type": "freeform"}
    assert recs["vqa-rad-1511"].answer == "4" and recs["vqa-rad-1511"].answer_type == "open"  # int answer
    assert recs["vqa-rad-31"].split == "test" and recs["vqa-rad-32"].split == "test"
    f = recs["vqa-rad-31-frame"]  # the frame of a test question goes to train, as in MEVF's split
    assert (f.question, f.split, f.answer, f.meta) == ("Are there >12 of ribs?", "train", "Yes", {"phrase_type": "frame"})
    assert "vqa-rad-1511-frame" in recs and "vqa-rad-0-frame" not in recs
    rep = convert("vqa-rad", FIX / "vqa_rad", tmp_path / "nf.jsonl", vqa_rad_frames="none")
    assert rep.counts == {"train": 3, "test": 2} and rep.filtered == 3
    # The OSF file name (with spaces) reads the same.
    osf = tmp_path / "osf"
    shutil.copytree(FIX / "vqa_rad", osf)
    (osf / "VQA_RAD_Dataset_Public.json").rename(osf / "VQA_RAD Dataset Public.json")
    assert convert("vqa-rad", osf, tmp_path / "o.jsonl").counts == {"train": 6, "test": 2}


def test_vqa_rad_mevf_layout(tmp_path):
    rep = convert("vqa-rad", FIX / "vqa_rad_mevf", tmp_path / "m.jsonl")
    assert rep.layouts == ["vqa-rad-mevf"] and rep.counts == {"train": 4, "test": 2} and rep.n_bad == 0
    recs = _load(tmp_path / "m.jsonl")
    assert recs["vqa-rad-33"].meta == {"phrase_type": "frame"} and recs["vqa-rad-33"].answer_type == "closed"
    assert recs["vqa-rad-32"].split == "test" and recs["vqa-rad-50"].body_part == "CHEST"
    assert convert("vqa-rad", FIX / "vqa_rad_mevf", tmp_path / "n.jsonl", vqa_rad_frames="none").counts == \
        {"train": 2, "test": 2}


# --- PathVQA ------------------------------------------------------------------------------------

def test_pathvqa_qa_pkl_duplicates_dropped_and_listed(tmp_path):
    out = tmp_path / "p.jsonl"
    rep = convert("pathvqa", FIX / "pathvqa", out)
    assert rep.layouts == ["pathvqa-qa-pkl"]
    # train_0115's questions 5-7 repeat 1-3 exactly (the release's duplicates); test_0005.jpg is absent.
    assert [(d.entry, d.first_entry, d.dropped) for d in rep.duplicates] == [(5, 1, True), (6, 2, True), (7, 3, True)]
    assert [(Path(s.file).name, s.entry, s.field) for s in rep.skipped] == [("test_qa.pkl", 4, "images[0]")]
    assert rep.counts == {"train": 9, "val": 3, "test": 3}
    assert len(_report(out)["duplicates"]) == 3
    recs = _load(out)
    assert recs["pathvqa-train-1"].answer == "a solitary" and recs["pathvqa-train-3"].answer_type == "closed"
    assert recs["pathvqa-train-1"].answer_type == "open" and recs["pathvqa-train-3"].qtype == "yes/no"
    assert recs["pathvqa-val-1"].images[0].endswith("images/val/val_0000.jpg")
    keep = convert("pathvqa", FIX / "pathvqa", tmp_path / "k.jsonl", keep_duplicates=True)
    assert keep.counts["train"] == 12 and not any(d.dropped for d in keep.duplicates)


def test_pathvqa_vqa_pkl_and_lxmert_json_layouts(tmp_path):
    rep = convert("pathvqa", FIX / "pathvqa_vqa", tmp_path / "v.jsonl")
    assert rep.layouts == ["pathvqa-vqa-pkl"] and rep.counts == {"train": 4}
    recs = _load(tmp_path / "v.jsonl")
    r = recs["pathvqa-100422000"]
    assert (r.question, r.answer, r.qtype, r.answer_type) == (
        "Where are liver stem cells (oval cells) located?", "in the canals of hering", "where", "open")
    assert recs["pathvqa-100422003"].answer_type == "closed"
    rep = convert("pathvqa", FIX / "pathvqa_lxmert", tmp_path / "l.jsonl")
    assert rep.layouts == ["pathvqa-lxmert-json"] and rep.counts == {"train": 9, "val": 13, "test": 3}
    assert len(rep.duplicates) == 3 and _load(tmp_path / "l.jsonl")["pathvqa-train_0422-0"].answer == \
        "in the canals of hering"


def test_pathvqa_unreadable_pickle_is_one_reported_file(tmp_path):
    root = tmp_path / "pv"
    shutil.copytree(FIX / "pathvqa", root)
    (root / "qas/test/test_qa.pkl").write_bytes(b"not a pickle")
    rep = convert("pathvqa", root, tmp_path / "p.jsonl")
    assert [(Path(s.file).name, s.entry, s.field) for s in rep.skipped] == [("test_qa.pkl", 0, "<file>")]
    assert rep.counts == {"train": 9, "val": 3}


# --- OmniMedVQA ---------------------------------------------------------------------------------

def test_omnimedvqa_open_access_by_default_missing_images_reported(tmp_path):
    out = tmp_path / "o.jsonl"
    rep = convert("omnimedvqa", FIX / "omnimedvqa", out)
    assert rep.counts == {"test": 2} and rep.total == 3
    assert [(Path(s.file).name, s.entry, s.field) for s in rep.skipped] == [("ISIC2019.json", 1, "images[0]")]
    assert any("Restricted-access" in n for n in rep.notes)
    recs = _load(out)
    r = recs["omnimedvqa-Chest CT Scan_0000"]  # the release spells modality_type "modality" in this file
    assert r.options == ["Angiography", "Electrocardiogram (ECG)", "Mammogram", "CT"] and r.answer == "CT"
    assert (r.qtype, r.modality, r.answer_type) == ("Modality Recognition", "CT(Computed Tomography)", "closed")
    assert r.meta == {"dataset": "Chest CT Scan", "access": "open"} and r.source == "omnimedvqa/Chest CT Scan"
    assert recs["omnimedvqa-Chest CT Scan-2"].qtype == "Disease Diagnosis"  # no question_id: file and entry
    rep = convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "r.jsonl", restricted=True)
    assert rep.total == 4 and rep.counts == {"test": 2}
    assert [Path(s.file).parent.name for s in rep.skipped] == ["Open-access", "Restricted-access"]
    with pytest.raises(DataError) as e:
        convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "x.jsonl", strict=True)
    assert e.value.file.endswith("ISIC2019.json") and e.value.field == "images[0]"


def test_omnimedvqa_hash_split_is_deterministic(tmp_path):
    for name in ("a", "b"):
        convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / f"{name}.jsonl", split_fractions=(0.5, 0.0, 0.5))
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


# --- PMC-VQA ------------------------------------------------------------------------------------

def test_pmc_vqa_v1_choices_cleaned_and_inconsistent_rows_reported(tmp_path):
    rep = convert("pmc-vqa", FIX / "pmc_vqa", tmp_path / "p.jsonl", pmc_vqa_version="1")
    assert rep.layouts == ["pmc-vqa-v1"] and rep.counts == {"train": 5, "test": 1}
    assert [(s.entry, s.field) for s in rep.skipped] == [(2, "Answer_label"), (7, "Answer_label"), (8, "Answer")]
    recs = _load(tmp_path / "p.jsonl")
    r = recs["pmc-vqa-train-1"]
    assert r.options == ["Diffuse uptake pattern", "Focal uptake pattern", "No uptake pattern",
                         "Cannot determine from the information given"]
    assert (r.answer, r.question, r.answer_type) == ("Focal uptake pattern", "What is the uptake pattern in the breast?",
                                                     "closed")
    assert recs["pmc-vqa-train-5"].options[1] == "Axillary tumor"  # the wrong "C:" prefix of Choice B goes too
    assert recs["pmc-vqa-train-4"].answer == "Solitary level expression of signal S"  # stray quote stripped
    assert recs["pmc-vqa-train-6"].options[0].startswith("The photomicrograph")        # \xa0 stripped
    assert recs["pmc-vqa-test_clean-1"].answer == "Magnetic resonance imaging"


def test_pmc_vqa_v2_is_the_default(tmp_path):
    rep = convert("pmc-vqa", FIX / "pmc_vqa", tmp_path / "p.jsonl")
    assert rep.layouts == ["pmc-vqa-v2"] and rep.counts == {"train": 1, "test": 1}
    recs = _load(tmp_path / "p.jsonl")
    assert recs["pmc-vqa-test_2-62"].answer == "Left Anterior Descending Coronary Artery"
    assert recs["pmc-vqa-train_2-35"].answer == "Red" and recs["pmc-vqa-train_2-35"].images[0].endswith(
        "figures/PMC8253797_Fig4_11.jpg")


# --- MMMU Health & Medicine ---------------------------------------------------------------------

def test_mmmu_parquet_images_written_beside_output_and_test_answers(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "m.jsonl"
    rep = convert("mmmu-med", FIX / "mmmu", out)
    assert rep.counts == {"val": 2} and rep.filtered == 1 and rep.n_bad == 0
    recs = _load(out)
    r = recs["mmmu-validation_Clinical_Medicine_3"]
    assert (r.answer, r.options, r.answer_type) == ("Gallbladder", ["Stomach", "Liver", "Gallbladder", "Duodenum"], "closed")
    assert Path(r.images[0]).parent == tmp_path / "m_images" and Path(r.images[0]).is_file()
    assert r.modality == "Body Scans: MRI, CT scans, and X-rays" and r.meta["subject"] == "Clinical_Medicine"
    rep = convert("mmmu-med", FIX / "mmmu", tmp_path / "t.jsonl", answers=FIX / "mmmu" / "answers_test.json")
    assert rep.counts == {"val": 2, "test": 1} and rep.filtered == 0
    assert _load(tmp_path / "t.jsonl")["mmmu-test_Basic_Medical_Science_219"].answer == "Superior Olivary Nuclei."


def test_mmmu_open_questions_and_other_subjects(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "mmmu"
    shutil.copytree(FIX / "mmmu", root)
    t = pq.read_table(root / "Clinical_Medicine/validation-00000-of-00001.parquet").to_pylist()
    t[1].update(options="[]", question_type="open", answer="30")  # an open question (answer kept as text)
    t[0].update(answer="Z")                                      # a letter that names no option: a bad entry
    pq.write_table(pa.Table.from_pylist(t), root / "Clinical_Medicine/validation-00000-of-00001.parquet")
    (root / "Art").mkdir()
    shutil.copy(root / "Clinical_Medicine/validation-00000-of-00001.parquet", root / "Art/validation-00000-of-00001.parquet")
    rep = convert("mmmu-med", root, tmp_path / "m.jsonl")
    assert [(s.entry, s.field) for s in rep.skipped] == [(1, "answer")]
    assert any("Art" in n for n in rep.notes)
    r = _load(tmp_path / "m.jsonl")["mmmu-validation_Clinical_Medicine_15"]
    assert (r.answer, r.options, r.answer_type, r.qtype) == ("30", None, "open", "open")


# --- MedXpertQA MM ------------------------------------------------------------------------------

def test_medxpertqa_hf_and_eval_layouts(tmp_path):
    rep = convert("medxpertqa-mm", FIX / "medxpertqa", tmp_path / "h.jsonl")
    assert rep.layouts == ["medxpertqa-hf"] and rep.counts == {"test": 3}
    r = _load(tmp_path / "h.jsonl")["medxpertqa-MM-0"]
    assert r.answer == "Lateral collateral ligament complex repair or reconstruction" and len(r.options) == 5
    assert "Answer Choices" not in r.question and r.question.endswith("contribute the most to rotatory stability?")
    assert (r.qtype, r.body_part, r.meta, r.answer_type) == ("Reasoning", "Skeletal", {"medical_task": "Treatment"}, "closed")
    assert len(r.images) == 2
    rep = convert("medxpertqa-mm", FIX / "medxpertqa_eval", tmp_path / "e.jsonl")
    assert rep.layouts == ["medxpertqa-eval"] and rep.counts == {"test": 2}
    assert [(s.entry, s.field) for s in rep.skipped] == [(2, "images[1]")]  # MM-1-b.png absent
    assert _load(tmp_path / "e.jsonl")["medxpertqa-MM-0"].options == r.options


# --- command line -------------------------------------------------------------------------------

def test_cli_default_skips_and_lists_strict_fails(tmp_path, capsys):
    assert _cli(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "s.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "16 records" in out and "train.json:7 (slake-1622): field 'answer': empty (skipped)" in out
    assert (tmp_path / "s.report.json").is_file()
    assert _cli(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "k.jsonl"), "--skip-bad"]) == 0
    capsys.readouterr()
    assert _cli(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "t.jsonl"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "train.json:7: field 'answer'" in err and not (tmp_path / "t.jsonl").exists()
    with pytest.raises(ValueError, match="contradict"):
        _cli(["slake", "--root", str(FIX / "slake"), "--out", str(tmp_path / "x.jsonl"), "--strict", "--skip-bad"])


def test_summary_lists_at_most_fifty_and_points_at_the_report(tmp_path):
    root = tmp_path / "omni"
    (root / "QA_information/Open-access").mkdir(parents=True)
    entry = json.loads((FIX / "omnimedvqa/QA_information/Open-access/ISIC2019.json").read_text())[0]
    (root / "QA_information/Open-access/ISIC2019.json").write_text(json.dumps([entry] * 60))
    rep = convert("omnimedvqa", root, tmp_path / "o.jsonl")
    text = str(rep)
    assert rep.n_bad == 60 and rep.written == 0 and "... and 10 more bad entries" in text and "o.report.json" in text
    assert len(_report(tmp_path / "o.jsonl")["bad"]) == 60


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        convert("mimic", FIX, tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="VQA_RAD"):
        convert("vqa-rad", FIX / "slake", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="split_fractions"):
        convert("omnimedvqa", FIX / "omnimedvqa", tmp_path / "x.jsonl", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="contradict"):
        convert("slake", FIX / "slake", tmp_path / "x.jsonl", strict=True, skip_bad=True)
    # The old API: skip_bad=False (its default then) means strict.
    with pytest.raises(DataError):
        convert("slake", FIX / "slake", tmp_path / "x.jsonl", skip_bad=False)


def test_pickle_fixture_is_plain_data():
    data = pickle.loads((FIX / "pathvqa/qas/train/train_qa.pkl").read_bytes())
    assert all(set(e) == {"image", "question", "answer"} for e in data)
