"""Write grey-scale DICOM Part 10 files (Explicit VR Little Endian, native pixels).

Used by ``medlvr synth --format dicom`` and by the tests, which write the CT / MR /
MONOCHROME1 / multi-frame / series cases they check. Files are deterministic: UIDs come from
``uid_seed`` through pydicom's hash-based ``generate_uid(entropy_srcs=...)`` and no date, time
or random value is written (pydicom's implementation UID and version name do appear in the
file meta, so the bytes are fixed for a given pydicom version).

The attributes cover the mandatory (type 1) and required-empty (type 2) ones of the modules
of the CT, MR and CR Image IODs (PS3.3 A.3, A.4, A.2): Patient, General Study, General Series,
Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel, the modality's
image module, VOI LUT and SOP Common. Multi-frame files use the Multi-frame Grayscale
Byte/Word Secondary Capture SOP classes, which allow rescale and window at the top level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medlvr.imageio.errors import require

_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",            # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",            # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",            # Computed Radiography Image Storage
}
_MULTIFRAME_SC = {8: "1.2.840.10008.5.1.4.1.1.7.2", 16: "1.2.840.10008.5.1.4.1.1.7.3"}  # byte / word SC


def write_dicom(path, stored: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                voi_function: str | None = None, bits_stored: int | None = None, instance_number: int = 1,
                uid_seed: Sequence | None = None, series_seed: Sequence | None = None,
                pixel_spacing: tuple[float, float] = (1.0, 1.0), slice_position: float = 0.0) -> Path:
    """Write ``stored`` ((H, W) or (frames, H, W); uint8, uint16 or int16) as a DICOM file.

    rescale: (RescaleSlope, RescaleIntercept); for CT the result is HU (RescaleType HU).
    window: (WindowCenter, WindowWidth) with VOILUTFunction ``voi_function`` when given.
    uid_seed: values that make the SOP instance UID (None: random); series_seed the same for the
    study / series / frame-of-reference UIDs (default: uid_seed), so the files of one series
    share them. Returns the path.
    """
    pydicom = require("pydicom", "writing DICOM")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = _checked_pixels(stored, photometric, modality)
    multiframe = arr.ndim == 3
    bits = arr.dtype.itemsize * 8

    def uid(*tag) -> str:
        seed = series_seed if series_seed is not None and tag[0] != "instance" else uid_seed
        return generate_uid(entropy_srcs=[str(v) for v in (*seed, *tag)]) if seed is not None else generate_uid()

    sop_class = _MULTIFRAME_SC[bits] if multiframe else _SOP_CLASSES[modality]
    sop_instance = uid("instance")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.SpecificCharacterSet = "ISO_IR 100"
    _study_modules(ds, uid, modality)
    _image_modules(ds, modality, multiframe=multiframe, instance_number=instance_number,
                   pixel_spacing=pixel_spacing, slice_position=slice_position)
    # Image Pixel: Rows, Columns, BitsAllocated/Stored, HighBit, PixelRepresentation,
    # NumberOfFrames and PixelData, consistent by construction.
    ds.set_pixel_data(arr, photometric, bits_stored or bits, generate_instance_uid=False)
    if multiframe:
        ds.FrameIncrementPointer = 0x00181063   # FrameTime
        ds.FrameTime = 1.0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
        if modality == "CT":
            ds.RescaleType = "HU"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
        if voi_function:
            ds.VOILUTFunction = voi_function
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _checked_pixels(stored, photometric: str, modality: str) -> np.ndarray:
    """``stored`` as an array, checked to be pixels write_dicom can store."""
    arr = np.asarray(stored)
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        raise TypeError(f"stored: expected uint8, uint16 or int16 pixels, got {arr.dtype}")
    if arr.ndim not in (2, 3) or min(arr.shape) < 1:
        raise ValueError(f"stored: expected (H, W) or (frames, H, W), got shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric: expected MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if arr.ndim == 2 and modality not in _SOP_CLASSES:
        raise ValueError(f"modality: expected one of {tuple(_SOP_CLASSES)} for a single frame, got {modality!r}")
    return arr


def _study_modules(ds, uid, modality: str) -> None:
    """Patient / General Study / General Series / Frame of Reference / General Equipment."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^MEDLVR", "medlvr-synthetic", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.StudyID, ds.SeriesNumber = "1", 1
    ds.Modality = modality
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uid("frame-of-reference"), ""
    ds.Manufacturer = "medlvr"


def _image_modules(ds, modality: str, *, multiframe: bool, instance_number: int,
                   pixel_spacing: tuple[float, float], slice_position: float) -> None:
    """General Image / Image Plane and the modality's image module (its type 2 attributes empty)."""
    ds.InstanceNumber = int(instance_number)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if modality == "CT" else ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(slice_position)]
    ds.SliceThickness = 1.0
    if modality == "CT":
        ds.KVP, ds.AcquisitionNumber = "", ""
    elif modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime = ds.EchoTime = ""
        ds.EchoTrainLength = ""
    if multiframe:
        ds.ConversionType = "WSD"
