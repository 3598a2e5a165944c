"""Image reading: a 512x512 CT slice through medlvr.imageio beside PIL's PNG decode and peers.

    python benchmarks/bench_image_io.py            # the issue's case: 512x512 CT, as committed
    python benchmarks/bench_image_io.py --quick    # 128x128, a few iterations (smoke test)

Every row is the wall time of one call, file on disk (page cache warm) -> 8-bit RGB PIL image
ready for the processor, median of --iters calls. Providers:

  PIL PNG (8-bit)              Image.open + convert("RGB") of the same slice already windowed
                               and saved as an 8-bit PNG: what a PNG dataset costs (reference).
  medlvr DICOM, file window    load_image on the CT: dcmread, pixel decode, rescale to HU, the
                               file's WindowCenter/Width, 8-bit RGB. The issue's target: <= 5 ms.
  medlvr DICOM, preset         the same file without a window, --window mediastinum.
  medlvr DICOM, percentile     the same without any window: 0.5/99.5 percentile stretch (MR path).
  medlvr 16-bit PNG, preset    the stored values as a 16-bit PNG, windowed like DICOM.
  medlvr NIfTI slice (.nii /.nii.gz)   one slice of a 512x512x8 volume of the same HU.
  pydicom pipeline             pixel_array + apply_modality_lut + apply_voi_lut (pydicom's own
                               helpers) + scaling to uint8 RGB: the closest library peer.
  min-max (RadFM style)        pixel_array, min-max stretch of the stored values (no rescale, no
                               window), uint8 RGB: the cheapest thing a converter does.
  SimpleITK / MONAI            named with the reason when not installed (not dependencies).
The "of which" rows split the medlvr DICOM time: dcmread alone, + pixel decode, windowing +
RGB on an already decoded HU array. Decoding is host (CPU) work whatever --device says.
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import parser, report, time_ms  # noqa: E402
from medlvr.imageio import load_image, read_pixels  # noqa: E402
from medlvr.imageio.dicom_write import write_dicom  # noqa: E402
from medlvr.imageio.windowing import Window, apply_window, to_rgb8  # noqa: E402

CPU = torch.device("cpu")


def phantom(n: int) -> np.ndarray:
    """A CT-like slice in HU: air, a body ellipse of soft tissue, two lungs, a bone ring, noise."""
    rng = np.random.default_rng(0)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n - 0.5
    hu = np.full((n, n), -1000.0)
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    hu[body] = 40
    for cx in (-0.18, 0.18):
        hu[((xx - cx) / 0.13) ** 2 + (yy / 0.22) ** 2 < 1] = -850
    ring = (xx / 0.45) ** 2 + (yy / 0.35) ** 2
    hu[(ring > 0.85) & (ring < 1)] = 700
    hu += rng.normal(0, 15, (n, n)) * body
    return np.rint(hu).astype(np.int16)


def write_inputs(folder: Path, n: int) -> dict[str, Path]:
    from PIL import Image

    hu = phantom(n)
    stored = (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    paths = {
        "ct_window": write_dicom(folder / "ct_window.dcm", stored, rescale=(1.0, -1024.0), window=(40.0, 400.0),
                                 bits_stored=12, uid_seed=("bench", 1)),
        "ct_plain": write_dicom(folder / "ct_plain.dcm", stored, rescale=(1.0, -1024.0), bits_stored=12,
                                uid_seed=("bench", 2)),
    }
    load_image(paths["ct_window"]).convert("L").save(folder / "ct8.png")
    paths["png8"] = folder / "ct8.png"
    Image.fromarray(hu.astype(np.int32) + 1024).convert("I;16").save(folder / "ct16.png")
    paths["png16"] = folder / "ct16.png"
    try:
        import nibabel as nib

        vol = np.repeat(hu.T[:, :, None], 8, axis=2)
        for suffix in (".nii", ".nii.gz"):
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / f"vol{suffix}"))
            paths[f"nifti{suffix}"] = folder / f"vol{suffix}"
    except ImportError:
        pass
    return paths


def pydicom_pipeline(path):
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # apply_voi_lut's LINEAR output spans [min, max] of the stored bit range's rescaled values.
    lo, hi = float(arr.min()), float(arr.max())
    u8 = np.rint((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    return Image.fromarray(u8, mode="L").convert("RGB")


def minmax(path):
    import pydicom
    from PIL import Image

    arr = pydicom.dcmread(path).pixel_array.astype(np.float32)
    u8 = np.rint((arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255).astype(np.uint8)
    return Image.fromarray(u8, mode="L").convert("RGB")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(iters=50, warmup=5)
    args = p.parse_args()
    if str(args.device).startswith("cuda"):
        print("note: image decoding runs on the host; timing on the CPU (results named for the CPU)")
    n = 128 if args.quick else 512
    iters, warmup = (5, 1) if args.quick else (args.iters, args.warmup)
    case = f"{n}x{n} CT slice"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(Path(tmp), n)

        def t(fn):
            return time_ms(fn, device=CPU, warmup=warmup, iters=iters)

        def row(provider, ms="", note=""):
            rows.append({"case": case, "provider": provider, "ms": ms, "note": note})

        from PIL import Image

        def png8():
            with Image.open(paths["png8"]) as im:
                return im.convert("RGB")

        row("PIL PNG (8-bit)", t(png8), "reference: the same slice pre-windowed")
        row("medlvr DICOM, file window", t(lambda: load_image(paths["ct_window"])), "target <= 5 ms")
        row("medlvr DICOM, preset", t(lambda: load_image(paths["ct_plain"], window="mediastinum")))
        row("medlvr DICOM, percentile", t(lambda: load_image(paths["ct_plain"])), "MR / radiograph path")
        row("medlvr 16-bit PNG, preset", t(lambda: load_image(paths["png16"], window="1400/1024")))
        for suffix in (".nii", ".nii.gz"):
            key = f"nifti{suffix}"
            if key in paths:
                row(f"medlvr NIfTI slice ({suffix})", t(lambda key=key: load_image(paths[key], index=4, window="mediastinum")),
                    "512x512x8 volume" if n == 512 else f"{n}x{n}x8 volume")
            else:
                row(f"medlvr NIfTI slice ({suffix})", "", "not run: nibabel not installed")
        row("pydicom pipeline", t(lambda: pydicom_pipeline(paths["ct_window"])),
            "pixel_array + apply_modality_lut + apply_voi_lut")
        row("min-max (RadFM style)", t(lambda: minmax(paths["ct_window"])), "no rescale, no window")
        for name, module in (("SimpleITK", "SimpleITK"), ("MONAI LoadImage", "monai")):
            if importlib.util.find_spec(module) is None:
                row(name, "", f"not run: {module} not installed")

        import pydicom
        from pydicom.pixels import pixel_array

        hu = read_pixels(paths["ct_window"]).values
        win = Window(40.0, 400.0)
        row("  of which: dcmread", t(lambda: pydicom.dcmread(paths["ct_window"])))
        row("  of which: dcmread + decode", t(lambda: pixel_array(pydicom.dcmread(paths["ct_window"]))))
        row("  of which: window + 8-bit RGB", t(lambda: to_rgb8(apply_window(hu, win))), "on the decoded HU array")
    ref = rows[0]["ms"]
    for r in rows:
        r["x PIL PNG"] = round(r["ms"] / ref, 2) if r["ms"] else ""
    name = "image_io-quick" if args.quick else "image_io"
    report(name, rows, device=CPU, out=args.out, x="case", y="ms", group="provider",
           title=f"Image reading to 8-bit RGB, {case} (one call, file in page cache)",
           notes=[f"pydicom {pydicom.__version__}, numpy {np.__version__}, median of {iters} calls; "
                  "decoding is host work (the device column names the CPU)."])


if __name__ == "__main__":
    main()
