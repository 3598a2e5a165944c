"""The one image reader: every path that loads an image goes through ``load_image``.

Training and evaluation batches, the engine's prompts (both built by
``medlvr.data.collate.collate``), record validation (``medlvr.data.records``) and
``medlvr convert`` read images here. What a record's image may be, by what the path names:

    a folder                    a DICOM series, slices ordered by InstanceNumber (dicom.py)
    *.nii, *.nii.gz             a NIfTI image or volume (nifti.py)
    *.dcm, *.dicom, *.dic, or   a DICOM file, single- or multi-frame (dicom.py)
      any file marked 'DICM'
    anything else               what PIL reads: 8-bit PNG/JPEG/… as they are; 16-bit or
                                float grey-scale PNG/TIFF windowed like DICOM; TIFF pages

A 3-D source (multi-frame DICOM, series folder, NIfTI volume, multi-page TIFF) needs a slice
index; a 2-D one takes none (or 0). The result is always an 8-bit RGB PIL image of the
source's own pixel grid (width x height unchanged), so ROI boxes given in the original pixel
coordinates map through the processor's resize exactly as they do for a PNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medlvr.imageio import dicom, nifti
from medlvr.imageio.errors import ImageReadError, slice_index
from medlvr.imageio.windowing import (Window, apply_window, parse_window, percentile_window,
                                      to_rgb8)

# PIL modes holding more than 8 bits of grey (16-bit PNG/TIFF, 32-bit int or float TIFF).
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    n_slices: int       # 1 for a 2-D image; frames / files / slices / pages of a 3-D source
    kind: str           # "dicom", "dicom-series", "nifti" or "pil"

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class Pixels:
    """One slice before display: modality values or an RGB array, and how to show it."""

    values: np.ndarray | None     # (H, W) float32 values (HU for CT); None when rgb is set
    rgb: np.ndarray | None        # (H, W, 3) uint8, display-ready (colour or 8-bit images)
    window: Window | None         # the file's own window
    invert: bool = False          # MONOCHROME1


def kind_of(path) -> str:
    p = Path(path)
    if p.is_dir():
        return "dicom-series"
    if nifti.is_nifti(p):
        return "nifti"
    if dicom.is_dicom(p):
        return "dicom"
    return "pil"


def _pil_open(path):
    try:
        return Image.open(path)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, …
        raise ImageReadError(path, "file", f"not a readable image ({type(e).__name__}: {e})") from None


def _pil_pages(im) -> int:
    # Only TIFF pages are slices; an animated PNG/GIF is read as its first frame, as before.
    return int(getattr(im, "n_frames", 1)) if im.format == "TIFF" else 1


_probe_cache: dict[tuple, ImageInfo] = {}


def probe_image(path, *, index: int | None = None) -> ImageInfo:
    """Size and slice count from the header, checking that slice ``index`` can be read.

    Cheap (no pixel decode) and cached per (path, mtime, size, index). Raises ImageReadError
    naming the file and the field for everything the readers can tell without decoding:
    unreadable files, no pixel data, a transfer syntax without a decoder, a truncated native
    pixel block, a slice index out of range."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        raise ImageReadError(p, "file", "not found") from None
    # A folder's mtime can miss a quick remove-and-add: series folders are not cached here
    # (dicom.series_files caches on the full listing).
    kind = kind_of(p)
    key = (str(p), st.st_mtime_ns, st.st_size, index)
    info = _probe_cache.get(key) if kind != "dicom-series" else None
    if info is not None:
        return info
    if kind in ("dicom", "dicom-series"):
        w, h, n = dicom.probe(p, index)
    elif kind == "nifti":
        w, h, n = nifti.probe(p, index)
    else:
        with _pil_open(p) as im:
            w, h, n = int(im.width), int(im.height), _pil_pages(im)
        slice_index(index, n, p, "pages")
    info = ImageInfo(width=w, height=h, n_slices=n, kind=kind)
    if kind != "dicom-series":
        _probe_cache[key] = info
    return info


def read_pixels(path, *, index: int | None = None) -> Pixels:
    """Decode one slice: modality values (HU for CT; after the rescale) or display-ready RGB."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file", "not found")
    kind = kind_of(p)
    if kind in ("dicom", "dicom-series"):
        s = dicom.read_slice(p, index)
        return Pixels(values=s.values, rgb=s.rgb, window=s.window, invert=s.invert)
    if kind == "nifti":
        values, window = nifti.read_slice(p, index)
        return Pixels(values=values, rgb=None, window=window)
    with _pil_open(p) as im:
        k = slice_index(index, _pil_pages(im), p, "pages")
        try:
            if k:
                im.seek(k)
            if im.mode in _DEEP_MODES:
                return Pixels(values=np.asarray(im, dtype=np.float32), rgb=None, window=None)
            return Pixels(values=None, rgb=np.asarray(im.convert("RGB")), window=None)
        except OSError as e:  # truncated or corrupt data surfaces at decode time
            raise ImageReadError(p, "file", f"image data unreadable ({type(e).__name__}: {e})") from None


def display_window(px: Pixels, window: str | Window | None = None) -> Window:
    """The window a grey-scale slice is shown with: the file's own, else ``window`` (a preset
    name or "W/L" pair from the record or the command line), else the percentile stretch."""
    if px.window is not None:
        return px.window
    named = window if isinstance(window, Window) else parse_window(window)
    return named if named is not None else percentile_window(px.values)


def to_display(px: Pixels, window: str | Window | None = None) -> Image.Image:
    """Windowing, MONOCHROME1 inversion and scaling to 8-bit RGB, in that order."""
    if px.rgb is not None:
        return Image.fromarray(px.rgb, mode="RGB")
    return to_rgb8(apply_window(px.values, display_window(px, window)), invert=px.invert)


def load_image(path, *, index: int | None = None, window: str | Window | None = None) -> Image.Image:
    """The 8-bit RGB image the processor gets for slice ``index`` of ``path``.

    window: a preset name ("lung", "mediastinum", "abdomen", "bone", "brain") or a "W/L" pair,
    used when the file has no window of its own; ignored for 8-bit and colour images, which are
    display-ready."""
    p = Path(path)
    if kind_of(p) == "pil" and not index:
        # 8-bit images are display-ready: their pixels are `Image.open(p).convert("RGB")`'s, untouched.
        with _pil_open(p) as im:
            if im.mode not in _DEEP_MODES and _pil_pages(im) == 1:
                try:
                    return im.convert("RGB")
                except OSError as e:
                    raise ImageReadError(p, "file", f"image data unreadable ({type(e).__name__}: {e})") from None
    return to_display(read_pixels(p, index=index), window)
