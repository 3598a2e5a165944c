"""DICOM reading: rescale to HU, window precedence, MONOCHROME1, frames, series folders, bad files.

Files come from two places: pydicom's bundled test files (only those shipped in the wheel,
opened by path, never through get_testdata_file, which may download) and files the tests
write with medlvr.imageio.dicom_write. Expected display values are computed here from the
DICOM definitions (PS3.3 C.11.2.1.2), not by calling the code under test.
"""
import os
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from medlvr.imageio import (ImageReadError, display_window, load_image, parse_window, probe_image,  # noqa: E402
                            read_pixels)
from medlvr.imageio.dicom_write import write_dicom  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


def bundled(name):
    path = os.path.join(BUNDLED, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


def linear(x, center, width):
    """DICOM LINEAR VOI function, piecewise as written in PS3.3 C.11.2.1.2.1, to 0..255."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.where(x <= lo, 0, np.where(x > hi, 255, y))).astype(np.uint8)


def grey(im):
    a = np.asarray(im)
    assert a.ndim == 3 and a.shape[2] == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def _ct(tmp_path, name="ct.dcm", **kw):
    # 12 x 16 CT slice: air everywhere, a bone block and a soft-tissue block at known pixels.
    hu = np.full((12, 16), -1000, np.int32)
    hu[2:5, 3:7] = 1200      # bone
    hu[7:10, 9:14] = 40      # soft tissue
    slope, intercept = 2.0, -1024.0
    stored = ((hu - intercept) / slope).astype(np.uint16)
    return write_dicom(tmp_path / name, stored, modality="CT", rescale=(slope, intercept), bits_stored=12, **kw), hu


def test_ct_rescale_gives_hu_at_known_pixels(tmp_path):
    path, hu = _ct(tmp_path)
    px = read_pixels(path)
    assert px.values.dtype == np.float32 and px.values.shape == (12, 16)
    assert px.values[3, 4] == 1200 and px.values[8, 10] == 40 and px.values[0, 0] == -1000
    np.testing.assert_array_equal(px.values, hu)
    assert probe_image(path).size == (16, 12)


def test_bundled_ct_small_rescale_intercept(tmp_path):
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
    px = read_pixels(path)
    for r, c in ((0, 0), (64, 64), (100, 27)):
        assert px.values[r, c] == raw[r, c] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # No window in the file: a preset applies, and it is the lung window's formula in HU.
    np.testing.assert_array_equal(grey(load_image(path, window="lung")), linear(px.values, -600, 1500))


def test_window_precedence_file_then_preset_then_percentile(tmp_path):
    plain, hu = _ct(tmp_path, "plain.dcm")
    windowed, _ = _ct(tmp_path, "windowed.dcm", window=(40.0, 400.0))
    # The file's own window wins over a named preset.
    np.testing.assert_array_equal(grey(load_image(windowed, window="lung")), linear(hu, 40, 400))
    assert display_window(read_pixels(windowed), "lung").source == "file"
    # Without one, the preset (or a W/L pair: width/level) is used.
    np.testing.assert_array_equal(grey(load_image(plain, window="bone")), linear(hu, 400, 1800))
    np.testing.assert_array_equal(grey(load_image(plain, window="350/50")), linear(hu, 50, 350))
    # Without either, the 0.5 / 99.5 percentiles stretch to black / white.
    out = grey(load_image(plain))
    lo, hi = np.percentile(hu, (0.5, 99.5))
    assert out[0, 0] == 0 and out[3, 4] == 255
    np.testing.assert_array_equal(out, np.rint(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))


def test_bundled_mr_uses_its_window(tmp_path):
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    values = read_pixels(path).values
    assert values.shape == (64, 64)
    np.testing.assert_array_equal(grey(load_image(path, window="brain")), linear(values, 600, 1600))


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    stored = np.array([[0, 100, 200], [300, 400, 511]], np.uint16)
    m2 = write_dicom(tmp_path / "m2.dcm", stored, modality="CR", window=(256.0, 512.0))
    m1 = write_dicom(tmp_path / "m1.dcm", stored, modality="CR", window=(256.0, 512.0), photometric="MONOCHROME1")
    a, b = grey(load_image(m2)).astype(int), grey(load_image(m1)).astype(int)
    np.testing.assert_array_equal(a, linear(stored, 256, 512))
    assert b[0, 0] == 255 and b[1, 2] == 0           # MONOCHROME1: the lowest value is white
    np.testing.assert_array_equal(np.abs(a + b - 255), np.zeros_like(a))


def test_multiframe_picks_the_named_frame(tmp_path):
    frames = np.stack([np.full((5, 7), 100 * (f + 1), np.uint16) for f in range(4)])
    frames[2, 1, 1] = 999
    path = write_dicom(tmp_path / "mf.dcm", frames, modality="OT", rescale=(0.5, 10.0))
    assert probe_image(path, index=3).n_slices == 4
    assert read_pixels(path, index=1).values[0, 0] == 200 * 0.5 + 10
    assert read_pixels(path, index=2).values[1, 1] == 999 * 0.5 + 10
    with pytest.raises(ImageReadError) as e:
        probe_image(path)
    assert e.value.field == "slice" and "required" in str(e.value) and "4 frames" in str(e.value)
    with pytest.raises(ImageReadError) as e:
        load_image(path, index=4)
    assert e.value.field == "slice" and "out of range" in str(e.value) and str(path) in str(e.value)


def test_enhanced_multiframe_functional_groups(tmp_path):
    # Rescale in the shared functional groups, a different window per frame.
    frames = np.stack([np.arange(20, dtype=np.uint16).reshape(4, 5) * (f + 1) for f in range(2)])
    path = write_dicom(tmp_path / "enh.dcm", frames, modality="OT")
    ds = pydicom.dcmread(path)
    shared = Dataset()
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 3.0, -5.0, "US"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for center in (20.0, 60.0):
        item, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 41.0
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(path, enforce_file_format=True)
    for f, center in enumerate((20.0, 60.0)):
        px = read_pixels(path, index=f)
        np.testing.assert_array_equal(px.values, frames[f] * 3.0 - 5.0)
        assert (px.window.center, px.window.width) == (center, 41.0)
        np.testing.assert_array_equal(grey(load_image(path, index=f)), linear(px.values, center, 41.0))


def test_series_folder_sorted_by_instance_number(tmp_path):
    series = tmp_path / "series"
    # File names sort opposite to the slice order: InstanceNumber decides.
    for k, name in enumerate(["c.dcm", "b.dcm", "a.dcm"]):
        write_dicom(series / name, np.full((6, 8), 50 * k, np.uint16), modality="CT", rescale=(1.0, -1024.0),
                    instance_number=k + 1, uid_seed=("s", k), series_seed=("series",))
    (series / "DICOMDIR").write_bytes(b"ignored")
    info = probe_image(series, index=0)
    assert (info.kind, info.n_slices, info.size) == ("dicom-series", 3, (8, 6))
    assert [read_pixels(series, index=k).values[0, 0] for k in range(3)] == [-1024, -974, -924]
    with pytest.raises(ImageReadError) as e:
        probe_image(series, index=3)
    assert e.value.field == "slice"
    # A second series in the folder, or a repeated InstanceNumber, makes the order ambiguous.
    write_dicom(series / "d.dcm", np.zeros((6, 8), np.uint16), modality="CT", instance_number=2,
                uid_seed=("s", 9), series_seed=("series",))
    with pytest.raises(ImageReadError) as e:
        probe_image(series, index=0)
    assert e.value.field == "InstanceNumber" and "d.dcm" in str(e.value)
    (series / "d.dcm").unlink()
    write_dicom(series / "e.dcm", np.zeros((6, 8), np.uint16), modality="CT", instance_number=7,
                uid_seed=("other", 1))
    with pytest.raises(ImageReadError) as e:
        probe_image(series, index=0)
    assert e.value.field == "SeriesInstanceUID"


def test_bundled_colour_files_are_display_ready():
    im = load_image(bundled("examples_palette.dcm"))
    assert im.mode == "RGB" and im.size == (800, 350)
    im = load_image(bundled("SC_rgb_rle_2frame.dcm"), index=1)
    a = np.asarray(im)
    assert a.shape == (100, 100, 3) and len(np.unique(a.reshape(-1, 3), axis=0)) > 1


# ------------------------------------------------------------------ bad input


def test_corrupt_files_name_file_and_field(tmp_path):
    with pytest.raises(ImageReadError) as e:
        probe_image(bundled("MR_truncated.dcm"))
    assert e.value.field == "PixelData" and "MR_truncated.dcm" in str(e.value) and "expected 8192" in str(e.value)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file " * 20)
    with pytest.raises(ImageReadError) as e:
        load_image(junk)
    assert e.value.field == "file" and str(junk) in str(e.value)


def test_no_pixel_data(tmp_path):
    with pytest.raises(ImageReadError) as e:
        probe_image(bundled("rtplan.dcm"))
    assert e.value.field == "PixelData" and "RT Plan" in str(e.value)
    path, _ = _ct(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError) as e:
        load_image(path)
    assert e.value.field == "PixelData" and "missing" in str(e.value)


def test_compressed_without_decoder():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = bundled("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(ImageReadError) as e:
        probe_image(path)
    assert e.value.field == "TransferSyntaxUID" and "JPEG-LS" in str(e.value) and "no decoder" in str(e.value)


def test_unknown_preset_names_the_choices(tmp_path):
    path, _ = _ct(tmp_path)
    with pytest.raises(ValueError) as e:
        load_image(path, window="lungs")
    assert "window" in str(e.value) and "lung, mediastinum, abdomen, bone, brain" in str(e.value)
    with pytest.raises(ValueError, match="width must be >= 1"):
        parse_window("0/40")


def test_missing_pydicom_names_the_package(tmp_path, monkeypatch):
    path, _ = _ct(tmp_path)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="'pydicom'.*medlvr\\[medical\\]"):
        read_pixels(path)
