"""NIfTI slices, 16-bit PNG / multi-page TIFF, 8-bit images unchanged, and the windowing maths."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlvr.imageio import (PRESETS, ImageReadError, Window, apply_window, load_image, parse_window, probe_image,
                            read_pixels)
from medlvr.imageio.windowing import percentile_window

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def grey(im):
    a = np.asarray(im)
    assert a.shape[2] == 3 and (a[..., 0] == a[..., 2]).all()
    return a[..., 0]


# ------------------------------------------------------------------ NIfTI


def _volume(tmp_path, name="vol.nii.gz", cal=None):
    nib = pytest.importorskip("nibabel")
    # Voxel (i, j, k) holds 100 k + 10 j + i (stored as int16, scaled by scl_slope 2, scl_inter -7).
    i, j, k = np.meshgrid(np.arange(6), np.arange(4), np.arange(5), indexing="ij")
    stored = (100 * k + 10 * j + i).astype(np.int16)
    img = nib.Nifti1Image(stored, affine=np.eye(4))
    img.header.set_slope_inter(2.0, -7.0)
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    nib.save(img, str(tmp_path / name))
    return tmp_path / name, stored * 2.0 - 7.0


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_slice_values_and_orientation(tmp_path, name):
    path, values = _volume(tmp_path, name)
    info = probe_image(path, index=3)
    assert (info.kind, info.n_slices, info.size) == ("nifti", 5, (6, 4))   # width = dim[1], height = dim[2]
    px = read_pixels(path, index=3)
    assert px.values.shape == (4, 6) and px.window is None
    # Pixel (x, y) is voxel (i = x, j = y): row y, column x.
    assert px.values[2, 5] == values[5, 2, 3] == (300 + 20 + 5) * 2 - 7
    np.testing.assert_array_equal(px.values, values[:, :, 3].T)
    out = grey(load_image(path, index=3, window="100/600"))
    assert out.shape == (4, 6) and out[0, 0] < out[3, 5]


def test_nifti_cal_range_is_the_file_window(tmp_path):
    path, values = _volume(tmp_path, cal=(380.0, 480.0))
    px = read_pixels(path, index=2)          # values 393 .. 463: cal_min -> black, cal_max -> white
    assert (px.window.center, px.window.width, px.window.function) == (430.0, 100.0, "LINEAR_EXACT")
    expected = np.rint(np.clip((values[:, :, 2].T - 380) / 100, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(grey(load_image(path, index=2, window="lung")), expected)


def test_nifti_bad_slice_and_corrupt_file(tmp_path):
    path, _ = _volume(tmp_path)
    for index, msg in ((5, "out of range"), (None, "required"), (-1, "out of range")):
        with pytest.raises(ImageReadError) as e:
            probe_image(path, index=index)
        assert e.value.field == "slice" and msg in str(e.value) and str(path) in str(e.value)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ImageReadError) as e:
        probe_image(bad, index=0)
    assert e.value.field == "file" and "bad.nii.gz" in str(e.value)


def test_missing_nibabel_names_the_package(tmp_path, monkeypatch):
    path, _ = _volume(tmp_path)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match="'nibabel'"):
        read_pixels(path, index=0)


# ------------------------------------------------------------------ PIL formats


def test_16bit_png_is_stretched_or_windowed(tmp_path):
    a = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)          # 0 .. 59950
    Image.fromarray(a).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    px = read_pixels(tmp_path / "x16.png")
    np.testing.assert_array_equal(px.values, a)
    lo, hi = np.percentile(a.astype(np.float32), (0.5, 99.5))
    expected = np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(grey(load_image(tmp_path / "x16.png")), expected)
    # A W/L pair is in the file's units (here raw 16-bit values).
    out = grey(load_image(tmp_path / "x16.png", window="20001/30000"))
    # LINEAR, c = 30000, w = 20001: x = 30000 -> ((x - 29999.5) / 20000 + 0.5) * 255 = 127.506 -> 128.
    assert out[0, 0] == 0 and out[-1, -1] == 255 and out.flat[600] == 128


def test_multipage_tiff_pages_are_slices(tmp_path):
    pages = [Image.fromarray(np.full((8, 10), 1000 * (p + 1), np.uint16)) for p in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert probe_image(tmp_path / "stack.tif", index=2).n_slices == 3
    assert read_pixels(tmp_path / "stack.tif", index=2).values[0, 0] == 3000
    with pytest.raises(ImageReadError) as e:
        probe_image(tmp_path / "stack.tif", index=3)
    assert e.value.field == "slice"


def test_8bit_images_are_exactly_what_pil_gives(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 30)) * 255).astype(np.uint8)).save(tmp_path / "g.png")
    Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.jpg")
    for name in ("g.png", "c.jpg"):
        with Image.open(tmp_path / name) as im:
            ref = np.asarray(im.convert("RGB"))
        # An 8-bit image is display-ready: a window named for the dataset does not touch it.
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / name, window="lung")), ref)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError) as e:
        probe_image(tmp_path / "broken.png")
    assert e.value.field == "file" and "broken.png" in str(e.value)


# ------------------------------------------------------------------ windowing


def test_linear_window_matches_the_dicom_definition():
    # PS3.3 C.11.2.1.2.1 for center 40, width 400: x <= -160 -> 0, x > 239 -> 1, linear between.
    x = np.array([-1000, -160, -159.5, 39.5, 40, 239, 239.5, 3000], np.float32)
    y = apply_window(x, Window(40.0, 400.0))
    ref = np.where(x <= -160, 0, np.where(x > 239, 1, (x - 39.5) / 399 + 0.5))
    np.testing.assert_allclose(y, ref, atol=1e-7)
    assert y[3] == 0.5
    # Width 1 is the formula's limit: a threshold at c - 0.5.
    np.testing.assert_array_equal(apply_window(np.array([39, 39.5, 39.6]), Window(40.0, 1.0)), [0, 0, 1])


def test_linear_exact_and_sigmoid():
    x = np.array([-200, 0, 40, 240, 500], np.float32)
    np.testing.assert_allclose(apply_window(x, Window(40.0, 400.0, "LINEAR_EXACT")),
                               np.clip((x - 40) / 400 + 0.5, 0, 1), atol=1e-7)
    np.testing.assert_allclose(apply_window(x, Window(40.0, 400.0, "SIGMOID")),
                               1 / (1 + np.exp(-4 * (x - 40) / 400)), rtol=1e-6)


@pytest.mark.parametrize("shape,dtype", [((1,), np.float32), ((2,), np.int16), ((7, 3), np.float32),
                                         ((33, 17), np.int16), ((256, 256), np.float32)])
def test_percentile_window_equals_numpy_percentile(shape, dtype):
    x = np.random.default_rng(sum(shape)).normal(0, 300, shape).astype(dtype)
    w = percentile_window(x)
    lo, hi = np.percentile(x, (0.5, 99.5))
    if hi > lo:
        np.testing.assert_allclose([w.center - w.width / 2, w.center + w.width / 2], [lo, hi], rtol=1e-6, atol=1e-4)
    else:   # constant: mid-grey
        assert w.center == lo and apply_window(x, w).tolist() == [0.5] * x.size


def test_parse_window_presets_pairs_and_errors():
    assert parse_window(None) is None and parse_window("") is None
    w = parse_window("Lung")
    assert (w.width, w.center) == (1500, -600) and w.source == "preset lung"
    w = parse_window(" 400 / -50.5 ")
    assert (w.width, w.center) == (400, -50.5)
    for bad in ("lungs", "400", "a/b", "400/50/3"):
        with pytest.raises(ValueError, match="window: unknown preset"):
            parse_window(bad)
    with pytest.raises(ValueError, match="expected a preset name"):
        parse_window(1500)


def test_docs_table_lists_every_preset():
    text = DOCS.read_text()
    for name, (width, level) in PRESETS.items():
        assert re.search(rf"\|\s*`{name}`\s*\|\s*{width:g}\s*\|\s*{level:g}\s*\|", text), name
