"""NIfTI (.nii / .nii.gz): one slice of a volume -> values in the file's units (HU for CT).

Slice k of a 3-D volume is ``data[:, :, k]`` (the third voxel axis, axial for the usual
acquisitions), read through nibabel's array proxy so that only that slice is scaled
(scl_slope / scl_inter applied). It is shown without reorientation: pixel (x, y) of the image
is voxel (i = x, j = y, k), so the width is dim[1] and the height dim[2] of the header, and ROI
boxes in a record are in those voxel coordinates. A 2-D image (or a volume of one slice) needs
no slice index; a 4-D file must have a single volume.

The file's own display range is cal_min / cal_max when the header sets cal_max > cal_min
(medlvr/imageio/windowing.py says what happens otherwise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medlvr.imageio.errors import ImageReadError, require, slice_index
from medlvr.imageio.windowing import Window

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def _load(path):
    nib = require("nibabel", "reading NIfTI")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, gzip/EOF errors, HeaderDataError…
        raise ImageReadError(path, "file", f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise ImageReadError(path, "dim", f"expected a 2-D image or a 3-D volume, got shape {shape}")
    return img, shape


def probe(path, index: int | None) -> tuple[int, int, int]:
    """(width, height, number of slices) of a NIfTI file, checking the slice index."""
    _img, shape = _load(path)
    n = shape[2] if len(shape) == 3 else 1
    slice_index(index, n, path, "slices (dim[3])")
    return shape[0], shape[1], n


def read_slice(path, index: int | None) -> tuple[np.ndarray, Window | None]:
    """(values (H, W) float32, the file's cal_min/cal_max window or None) of slice ``index``."""
    img, shape = _load(path)
    n = shape[2] if len(shape) == 3 else 1
    k = slice_index(index, n, path, "slices (dim[3])")
    proxy = img.dataobj
    try:
        if len(img.shape) == 2:
            plane = np.asarray(proxy[:, :])
        elif len(img.shape) == 3:
            plane = np.asarray(proxy[:, :, k])
        else:
            plane = np.asarray(proxy[:, :, k, 0])
    except Exception as e:  # a truncated data block surfaces only here
        raise ImageReadError(path, "file", f"voxel data unreadable ({type(e).__name__}: {e})") from None
    if plane.dtype.kind == "c" or plane.dtype.names is not None:
        raise ImageReadError(path, "datatype", f"expected real scalar voxels, got {plane.dtype}")
    if plane.ndim != 2:
        # An RGB NIfTI comes back as a structured or extra-axis array: not a scalar image.
        raise ImageReadError(path, "datatype", f"expected one value per voxel, got a slice of shape {plane.shape}")
    values = np.ascontiguousarray(plane.T, dtype=np.float32)
    hdr = img.header
    lo, hi = float(hdr.get("cal_min", 0) or 0), float(hdr.get("cal_max", 0) or 0)
    window = None
    if hi > lo:
        window = Window(center=(lo + hi) / 2, width=hi - lo, function="LINEAR_EXACT", source="file")
    return values, window
