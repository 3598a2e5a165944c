"""Records whose images are DICOM / NIfTI: validation, --skip-bad, ROI boxes through collate,
`synth --format dicom`, `convert` on a DICOM dataset, and the CLI's --window."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from medlvr.cli import main  # noqa: E402
from medlvr.imageio import load_image, read_pixels  # noqa: E402
from medlvr.imageio.dicom_write import write_dicom  # noqa: E402
from medlvr.models import build_default, latent_token_ids  # noqa: E402
from medlvr.data.collate import collate  # noqa: E402
from medlvr.data.converters import convert  # noqa: E402
from medlvr.data.records import ROI, DataError, Record, load_jsonl, write_jsonl  # noqa: E402
from medlvr.data.synth import synthesize  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


def _ct(path, hu, **kw):
    return write_dicom(path, (np.asarray(hu) + 1024).astype(np.uint16), modality="CT", rescale=(1.0, -1024.0),
                       bits_stored=12, **kw)


def _write(path, objs):
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


def _rec(**kw):
    d = dict(question="Is there a lesion?", answer="yes")
    d.update(kw)
    return d


@pytest.fixture()
def medical_dir(tmp_path):
    _ct(tmp_path / "ct.dcm", np.full((40, 60), 40))
    for k in range(3):
        _ct(tmp_path / "series" / f"{9 - k}.dcm", np.full((20, 30), 100 * k), instance_number=k + 1,
            uid_seed=("s", k), series_seed=("series",))
    nib.save(nib.Nifti1Image(np.zeros((30, 20, 4), np.int16), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    write_dicom(tmp_path / "mf.dcm", np.zeros((2, 10, 12), np.uint16), modality="OT")
    return tmp_path


def test_jsonl_names_dicom_series_and_nifti_slices(medical_dir):
    f = _write(medical_dir / "d.jsonl", [
        _rec(id="a", images=["ct.dcm"], rois=[{"image": 0, "box": [0, 0, 60, 40]}], window="lung"),
        _rec(id="b", images=[{"path": "series", "slice": 2}, {"path": "vol.nii.gz", "slice": 3}],
             rois=[{"image": 1, "box": [1, 1, 30, 20]}]),
        _rec(id="c", images=[{"path": "mf.dcm", "slice": 1}]),
    ])
    recs, rep = load_jsonl(f, window="bone")
    assert rep.n_bad == 0
    a, b, c = recs
    assert a.window == "lung" and b.window == "bone"       # the record's own beats the command line's
    assert a.slices == [] and b.slices == [2, 3] and b.slice_of(1) == 3 and c.slices == [1]
    assert read_pixels(b.images[0], index=b.slice_of(0)).values[0, 0] == 200
    # write_jsonl writes {"path", "slice"} objects back and the window; the records round-trip.
    write_jsonl(medical_dir / "copy.jsonl", recs)
    line = json.loads((medical_dir / "copy.jsonl").read_text().splitlines()[1])
    assert line["images"] == [{"path": "series", "slice": 2}, {"path": "vol.nii.gz", "slice": 3}]
    assert load_jsonl(medical_dir / "copy.jsonl")[0] == recs


def test_bad_medical_records_are_named_counted_and_listed(medical_dir):
    (medical_dir / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage" * 10)
    nopix = _ct(medical_dir / "nopix.dcm", np.zeros((4, 4)))
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix, enforce_file_format=True)
    jpegls = os.path.join(BUNDLED, "MR_small_jpeg_ls_lossless.dcm")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    has_jpegls = get_decoder(JPEGLSLossless).is_available or not os.path.isfile(jpegls)
    if not has_jpegls:
        shutil.copy(jpegls, medical_dir / "jpegls.dcm")
    rows = [
        _rec(id="good", images=["ct.dcm"]),
        _rec(id="corrupt", images=["corrupt.dcm"]),
        _rec(id="nopix", images=["nopix.dcm"]),
        _rec(id="preset", images=["ct.dcm"], window="lungs"),
        _rec(id="slice-nifti", images=[{"path": "vol.nii.gz", "slice": 4}]),
        _rec(id="slice-frames", images=[{"path": "mf.dcm", "slice": 2}]),
        _rec(id="slice-series", images=[{"path": "series", "slice": 3}]),
    ] + ([] if has_jpegls else [_rec(id="jpegls", images=["jpegls.dcm"])])
    f = _write(medical_dir / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_jsonl(f)
    assert (e.value.line, e.value.field) == (2, "images[0]") and "corrupt.dcm: field 'file'" in str(e.value)
    recs, rep = load_jsonl(f, skip_bad=True)
    assert [r.id for r in recs] == ["good"] and rep.n_bad == len(rows) - 1
    got = [(ln, fld) for ln, fld, _ in rep.skipped]
    assert got[:6] == [(2, "images[0]"), (3, "images[0]"), (4, "window"), (5, "images[0].slice"),
                       (6, "images[0].slice"), (7, "images[0].slice")]
    msgs = [m for _, _, m in rep.skipped]
    assert "field 'PixelData': missing" in msgs[1] and "nopix.dcm" in msgs[1]
    assert "unknown preset 'lungs'" in msgs[2] and "lung, mediastinum" in msgs[2]
    assert "vol.nii.gz: field 'slice': index 4 out of range" in msgs[3]
    assert "mf.dcm: field 'slice'" in msgs[4] and "series: field 'slice'" in msgs[5]
    if not has_jpegls:
        assert got[6] == (8, "images[0]") and "field 'TransferSyntaxUID'" in msgs[6] and "no decoder" in msgs[6]
    text = str(rep)
    assert f"{len(rows) - 1} bad of {len(rows)}" in text and f"{f}:4: field 'window'" in text


def _seen_image(pixel_values, grid, processor):
    """Undo Qwen2-VL's patch flattening and normalisation: the (H, W, 3) image the vision tower saw.

    The processor lays patches out as (grid_t, gh/m, gw/m, m, m, C, T, p, p)."""
    ip = processor.image_processor
    p, m = int(ip.patch_size), int(ip.merge_size)
    gt, gh, gw = (int(v) for v in grid)
    x = pixel_values.reshape(gt, gh // m, gw // m, m, m, 3, -1, p, p)[0, ..., 0, :, :]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def test_dicom_roi_marks_the_bright_structure_after_resize(tmp_path):
    # A 150 x 90 CT slice: soft tissue with a block of bone at the ROI box, no window in the file.
    hu = np.full((90, 150), 40)
    box = (100, 20, 130, 50)
    hu[box[1]:box[3], box[0]:box[2]] = 1200
    _ct(tmp_path / "bone.dcm", hu)
    rec = Record(id="d", images=[str(tmp_path / "bone.dcm")], question="Is there a lesion?", options=None,
                 answer="yes", rois=[ROI(0, tuple(float(v) for v in box))], window="mediastinum")
    # The same pixels as an 8-bit PNG: the PNG path is the reference for the box mapping.
    shown = load_image(rec.images[0], window="mediastinum")
    assert shown.size == (150, 90) and np.asarray(shown)[30, 110, 0] == 255 and np.asarray(shown)[5, 5, 0] < 130
    shown.save(tmp_path / "bone.png")
    png = Record(**{**rec.__dict__, "images": [str(tmp_path / "bone.png")], "window": None})
    _, proc = build_default(seed=0)
    lt = latent_token_ids(proc)
    b = collate([rec], proc, k_latent=2, with_answer=True, latent_token_ids=lt)
    ref = collate([png], proc, k_latent=2, with_answer=True, latent_token_ids=lt)
    assert b.image_sizes.tolist() == [[150, 90]]
    torch.testing.assert_close(b.roi_boxes, ref.roi_boxes, rtol=0, atol=0)
    torch.testing.assert_close(b.pixel_values, ref.pixel_values, rtol=0, atol=0)
    rw, rh = b.resized_sizes[0].tolist()
    sx, sy = rw / 150, rh / 90
    torch.testing.assert_close(b.roi_boxes[0], torch.tensor([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]))
    # In the image the vision tower saw, the mapped box is the bright block.
    seen = _seen_image(b.pixel_values, b.image_grid_thw[0], proc)[..., 0]
    assert seen.shape == (rh, rw)
    x0, y0, x1, y1 = b.roi_boxes[0].tolist()
    inner = seen[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
    outside = np.ones_like(seen, dtype=bool)
    outside[max(0, int(y0) - 2):int(np.ceil(y1)) + 2, max(0, int(x0) - 2):int(np.ceil(x1)) + 2] = False
    assert inner.size > 0 and inner.min() > 235 and seen[outside].max() < 140


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_dicom_is_deterministic_ct_with_the_png_pixels(tmp_path):
    synthesize(tmp_path / "png", n=8, seed=3, image_size=64)
    for name in ("d1", "d2"):
        synthesize(tmp_path / name, n=8, seed=3, image_size=64, image_format="dicom")
    synthesize(tmp_path / "d3", n=8, seed=4, image_size=64, image_format="dicom")
    assert _digest(tmp_path / "d1") == _digest(tmp_path / "d2") != _digest(tmp_path / "d3")
    for split in ("train", "val", "test"):
        dcm, rep = load_jsonl(tmp_path / "d1" / f"{split}.jsonl")
        png, _ = load_jsonl(tmp_path / "png" / f"{split}.jsonl")
        assert rep.n_bad == 0
        for d, p in zip(dcm, png):
            assert d.images[0].endswith(".dcm") and d.rois == p.rois and d.answer == p.answer
            ds = pydicom.dcmread(d.images[0])
            assert ds.Modality == "CT" and ds.RescaleType == "HU" and float(ds.RescaleIntercept) == -1024
            v = np.asarray(Image.open(p.images[0]))
            np.testing.assert_array_equal(read_pixels(d.images[0]).values, v * 8.0 - 1000)   # HU
            np.testing.assert_array_equal(np.asarray(load_image(d.images[0]))[..., 0], v)


def _vqa_rad_dicom(root):
    _ct(root / "VQA_RAD Image Folder" / "ct1.dcm", np.full((32, 48), 40))
    (root / "VQA_RAD Image Folder" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
    entries = [
        {"qid": 0, "image_name": "ct1.dcm", "question": "Is this a CT?", "answer": "yes", "phrase_type": "freeform"},
        {"qid": 1, "image_name": "broken.dcm", "question": "Is there a mass?", "answer": "no", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "ct1.dcm", "question": "Is it contrast enhanced?", "answer": "no",
         "phrase_type": "test_freeform"},
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    return root


def test_convert_a_dicom_dataset_with_skip_bad_and_window(tmp_path, capsys):
    root = _vqa_rad_dicom(tmp_path / "vqa_rad")
    with pytest.raises(DataError) as e:
        convert("vqa-rad", root, tmp_path / "v.jsonl", strict=True)  # skipping bad entries is the default
    assert (e.value.line, e.value.field) == (2, "images[0]") and "broken.dcm: field 'file'" in str(e.value)
    rep = convert("vqa-rad", root, tmp_path / "v.jsonl", skip_bad=True, window="lung")
    assert rep.counts == {"train": 1, "test": 1} and rep.n_bad == 1
    recs, _ = load_jsonl(tmp_path / "v.jsonl")
    assert {r.window for r in recs} == {"lung"} and recs[0].images[0].endswith("ct1.dcm")
    assert main(["convert", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "c.jsonl"), "--skip-bad",
                 "--window", "1500/-600"]) == 0
    out = capsys.readouterr().out
    assert "1 bad skipped" in out and "broken.dcm: field 'file'" in out
    with pytest.raises(SystemExit):
        main(["convert", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--window", "lungs"])
    assert "unknown preset 'lungs'" in capsys.readouterr().err


def test_sft_trains_on_dicom_with_skip_bad(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        data = tmp_path / "data"
        assert main(["synth", "--out", str(data), "--n", "8", "--image-size", "56", "--split", "1", "0", "0",
                     "--format", "dicom"]) == 0
        (data / "images" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM")
        with open(data / "train.jsonl", "a") as f:
            f.write(json.dumps(_rec(id="broken", images=["images/broken.dcm"])) + "\n")
        assert main(["sft", "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "run"), "--k-latent", "2",
                     "--steps", "1", "--batch-size", "4", "--no-progress", "--threads", "1", "--skip-bad",
                     "--window", "abdomen"]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "8 good, 1 bad of 9 records" in out and "broken.dcm" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
