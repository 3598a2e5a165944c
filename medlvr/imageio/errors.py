"""The two ways reading an image fails: a bad file (ImageReadError) or a missing optional package."""
from __future__ import annotations

import importlib
import numbers


class ImageReadError(ValueError):
    """A file that cannot be read as an image: ``path`` and ``field`` say where, the message what.

    ``field`` is the DICOM keyword (``PixelData``, ``TransferSyntaxUID``, ``InstanceNumber``…),
    the NIfTI header field (``dim``…), ``slice`` for a slice index out of range, or ``file``
    when the file as a whole is unreadable (not DICOM, truncated header, not an image).
    """

    def __init__(self, path, field: str, message: str):
        self.path, self.field, self.message = str(path), field, message
        super().__init__(f"{path}: field '{field}': {message}")


# Optional dependencies: the package to import -> what to install. pydicom reads DICOM and
# nibabel NIfTI; both come with the `medical` extra (and the `test` extra, so CI has them).
_EXTRAS = {"pydicom": "pydicom>=3.0", "nibabel": "nibabel>=5"}


class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed; the message says how to install it."""


def require(package: str, purpose: str):
    """Import an optional dependency or raise MissingDependency naming it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MissingDependency(
            f"{purpose} needs the optional package '{package}', which is not installed: "
            f"pip install '{_EXTRAS.get(package, package)}' (or pip install 'medlvr[medical]')") from e


def slice_index(index: int | None, n: int, path, what: str) -> int:
    """Validate the slice index of an n-slice source: required when n > 1, in [0, n)."""
    if index is None:
        if n == 1:
            return 0
        raise ImageReadError(path, "slice", f"required: the source has {n} {what}; name one as "
                                            f"{{\"path\": ..., \"slice\": k}} with 0 <= k < {n}")
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < n:
        raise ImageReadError(path, "slice", f"index {index!r} out of range: the source has {n} {what} (0..{n - 1})")
    return int(index)
