"""Medical images as they come: DICOM files and series, NIfTI volumes, 16-bit PNG/TIFF.

``load_image(path, index=..., window=...)`` is what every image-loading path in medlvr calls;
``probe_image`` validates a record's image from its header. See docs/data.md ("Image
formats") for the formats, the DICOM pixel pipeline and the windowing table.
pydicom and nibabel are optional (``pip install 'medlvr[medical]'``); reading a DICOM or NIfTI
file without them raises ImportError naming the package.
"""
from medlvr.imageio.errors import ImageReadError
from medlvr.imageio.reader import (ImageInfo, Pixels, display_window, kind_of, load_image, probe_image,
                                   read_pixels, to_display)
from medlvr.imageio.windowing import PERCENTILES, PRESETS, Window, apply_window, parse_window, window_arg

__all__ = ["ImageReadError", "ImageInfo", "Pixels", "Window", "PRESETS", "PERCENTILES", "load_image",
           "probe_image", "read_pixels", "to_display", "display_window", "kind_of", "apply_window",
           "parse_window", "window_arg"]
