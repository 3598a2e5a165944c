"""DICOM: one file (single- or multi-frame) or a series folder -> modality values of one slice.

The pixel pipeline, in the order of DICOM's grayscale pipeline (modality LUT, VOI LUT, presentation):

1. Modality LUT: ModalityLUTSequence, else RescaleSlope / RescaleIntercept (stored values ->
   Hounsfield units for CT). Enhanced multi-frame objects keep them in the per-frame or shared
   functional groups (PixelValueTransformationSequence); both are looked up.
2. windowing (medlvr/imageio/windowing.py): the file's WindowCenter / WindowWidth /
   VOILUTFunction (top level, else FrameVOILUTSequence), else a named preset, else a stretch;
3. MONOCHROME1 inverted (its lowest value is white);
4. one frame of a multi-frame object. Steps 1-3 are per-pixel, so picking the frame first
   gives the same pixels and decodes only that frame (pydicom's ``pixel_array(ds, index=k)``);
5. scaling to 8-bit RGB, last.

This module does 1 and 4 and reports the file's window and the MONOCHROME1 flag; the reader
(medlvr/imageio/reader.py) applies 2, 3 and 5, the same way for every format. Colour images
(RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its lookup table) are
display-ready and skip windowing.

A series folder holds one single-frame file per slice; slices are ordered by InstanceNumber and
slice k is the k-th of that order. Files named DICOMDIR and hidden files are ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlvr.imageio.errors import ImageReadError, require, slice_index
from medlvr.imageio.windowing import VOI_FUNCTIONS, Window

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pydicom():
    return require("pydicom", "reading DICOM")


def is_dicom(path) -> bool:
    """A .dcm/.dicom/.dic file, or any file with the Part 10 marker 'DICM' at byte 128
    (PACS exports often have no extension)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass
class DicomSlice:
    values: np.ndarray | None     # (H, W) float32 modality values (HU for CT); None for colour
    rgb: np.ndarray | None        # (H, W, 3) uint8 for colour images, else None
    window: Window | None         # the file's own VOI window, if it has one
    invert: bool                  # MONOCHROME1
    source: Path                  # the file the slice came from (a member of a series folder)


def read_dataset(path, *, stop_before_pixels: bool = False):
    """dcmread, with a corrupt or non-DICOM file reported as ImageReadError(path, 'file', ...)."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except pydicom.errors.InvalidDicomError as e:
        raise ImageReadError(path, "file", f"not a DICOM Part 10 file ({e})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageReadError(path, "file", f"corrupt DICOM file ({type(e).__name__}: {e})") from None
    # pydicom reads leniently: garbage after the 'DICM' marker, or a file cut inside its header,
    # comes back as a near-empty dataset rather than an exception.
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        raise ImageReadError(path, "file", "corrupt DICOM file: its File Meta Information has no TransferSyntaxUID")
    if "SOPClassUID" not in ds and not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ImageReadError(path, "file", "corrupt or truncated DICOM file: neither SOPClassUID nor pixel data "
                                           "could be read")
    return ds


def _require_tag(ds, path, keyword: str):
    v = ds.get(keyword)
    if v is None or v == "":
        raise ImageReadError(path, keyword, "missing (needed to read the pixel data)")
    return v


def check_pixels(ds, path) -> int:
    """Check that ``ds`` holds pixel data this installation can decode; returns the frame count.

    No pixel data, missing image-pixel tags, a compressed transfer syntax without a decoder,
    and native pixel data shorter than Rows x Columns x frames x samples x bits say so here,
    naming the field, before anything is decoded.
    """
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import get_expected_length

    kind = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if kind is None:
        sop = ds.get("SOPClassUID")
        what = f" ({getattr(sop, 'name', sop)})" if sop else ""
        raise ImageReadError(path, "PixelData", f"missing: this DICOM object{what} holds no image")
    for kw in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        _require_tag(ds, path, kw)
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageReadError(path, "TransferSyntaxUID",
                             f"{tsyntax.name} ({tsyntax}): pydicom has no decoder for this transfer syntax") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
        raise ImageReadError(path, "TransferSyntaxUID",
                             f"{tsyntax.name} ({tsyntax}) is compressed and no decoder for it is installed "
                             f"({missing})")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if kind == "PixelData" and not tsyntax.is_encapsulated:
        expected = get_expected_length(ds, "bytes")
        got = len(ds.PixelData)
        if got < expected:
            raise ImageReadError(path, "PixelData",
                                 f"holds {got} bytes, expected {expected} for {ds.Rows} x {ds.Columns} x "
                                 f"{n_frames} frame(s) x {ds.SamplesPerPixel} sample(s) x {ds.BitsAllocated} bits "
                                 f"(truncated or corrupt file)")
    return n_frames


def _frame_item(ds, frame: int, sequence: str):
    """Item of a functional-group ``sequence`` for ``frame``: per-frame first, then shared."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i and sequence in seq[i] and len(seq[i][sequence].value):
            return seq[i][sequence].value[0]
    return None


def _first(v) -> float:
    return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)


def _rescale(ds, frame: int) -> tuple[float, float]:
    src = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else _frame_item(ds, frame, "PixelValueTransformationSequence")
    if src is None:
        return 1.0, 0.0
    slope, intercept = src.get("RescaleSlope"), src.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


def file_window(ds, frame: int, path) -> Window | None:
    """The object's own VOI window for ``frame`` (the first of several), or None."""
    src = ds if "WindowCenter" in ds else _frame_item(ds, frame, "FrameVOILUTSequence")
    if src is None or src.get("WindowCenter") in (None, "") or src.get("WindowWidth") in (None, ""):
        return None
    center, width = _first(src.WindowCenter), _first(src.WindowWidth)
    function = str(src.get("VOILUTFunction") or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        raise ImageReadError(path, "VOILUTFunction", f"expected one of {VOI_FUNCTIONS}, got {function!r}")
    if width < (1.0 if function == "LINEAR" else 0.0) or width == 0.0:
        raise ImageReadError(path, "WindowWidth", f"{width:g} is not a valid width for {function} (PS3.3 C.11.2.1.2)")
    return Window(center=center, width=width, function=function, source="file")


def decode(ds, path, index: int | None) -> DicomSlice:
    """One slice of a read dataset: modality values (or RGB), the file's window, MONOCHROME1."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    n = check_pixels(ds, path)
    k = slice_index(index, n, path, "frames (NumberOfFrames)")
    try:
        arr = pixel_array(ds, index=k if n > 1 else None)
    except Exception as e:  # decoders raise many types for a damaged stream
        raise ImageReadError(path, "PixelData", f"cannot be decoded ({type(e).__name__}: {e})") from None
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if photometric in _COLOUR or arr.ndim == 3:
        if arr.dtype != np.uint8:
            # 16-bit colour (rare): full scale of the stored bits -> 0..255.
            top = float(2 ** int(ds.get("BitsStored") or 16) - 1) if photometric != "PALETTE COLOR" else 65535.0
            arr = np.rint(np.clip(arr.astype(np.float32) / top, 0, 1) * 255).astype(np.uint8)
        return DicomSlice(values=None, rgb=np.ascontiguousarray(arr), window=None, invert=False, source=Path(path))
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    else:
        slope, intercept = _rescale(ds, k)
        values = arr.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    return DicomSlice(values=values, rgb=None, window=file_window(ds, k, path),
                      invert=photometric == "MONOCHROME1", source=Path(path))


_series_cache: dict[tuple, list[Path]] = {}


def series_files(folder) -> list[Path]:
    """The slice files of a series folder, ordered by InstanceNumber.

    Cached per listing (name, size, mtime of every file): a folder's own mtime can stay the
    same across a quick remove-and-add. Every file must be DICOM, of one SeriesInstanceUID,
    single-frame, with a distinct InstanceNumber; anything else is an ImageReadError naming the
    file and the field."""
    folder = Path(folder)
    with os.scandir(folder) as it:
        listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it
                         if e.is_file() and not e.name.startswith(".") and e.name.upper() != "DICOMDIR")
    key = (str(folder), tuple(listing))
    if key in _series_cache:
        return _series_cache[key]
    entries = [folder / name for name, _, _ in listing]
    if not entries:
        raise ImageReadError(folder, "file", "series folder holds no files")
    numbered: dict[int, Path] = {}
    series_uid = None
    for p in entries:
        ds = read_dataset(p, stop_before_pixels=True)
        number = ds.get("InstanceNumber")
        if number in (None, ""):
            raise ImageReadError(p, "InstanceNumber", "missing: a series folder is ordered by InstanceNumber")
        uid = ds.get("SeriesInstanceUID")
        if series_uid is None:
            series_uid = uid
        elif uid != series_uid:
            raise ImageReadError(p, "SeriesInstanceUID",
                                 f"{uid} differs from {series_uid} of {entries[0].name}: one series per folder")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise ImageReadError(p, "NumberOfFrames", "a series folder holds single-frame files; "
                                                      "name a multi-frame file directly with a slice index")
        if int(number) in numbered:
            raise ImageReadError(p, "InstanceNumber",
                                 f"{int(number)} also used by {numbered[int(number)].name}: the slice order is ambiguous")
        numbered[int(number)] = p
    files = [numbered[k] for k in sorted(numbered)]
    _series_cache[key] = files
    return files


def probe(path, index: int | None) -> tuple[int, int, int]:
    """(width, height, number of slices) after checking that slice ``index`` is decodable."""
    path = Path(path)
    if path.is_dir():
        files = series_files(path)
        k = slice_index(index, len(files), path, "slices (files ordered by InstanceNumber)")
        ds = read_dataset(files[k])
        check_pixels(ds, files[k])
        return int(ds.Columns), int(ds.Rows), len(files)
    ds = read_dataset(path)
    n = check_pixels(ds, path)
    slice_index(index, n, path, "frames (NumberOfFrames)")
    return int(ds.Columns), int(ds.Rows), n


def read_slice(path, index: int | None) -> DicomSlice:
    """Slice ``index`` of a DICOM file (its frame) or of a series folder (its k-th file)."""
    path = Path(path)
    if path.is_dir():
        files = series_files(path)
        k = slice_index(index, len(files), path, "slices (files ordered by InstanceNumber)")
        return decode(read_dataset(files[k]), files[k], None)
    return decode(read_dataset(path), path, index)
