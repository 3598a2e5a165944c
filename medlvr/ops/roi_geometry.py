"""Box geometry of one batch for ``roi_align_loss``, prepared once per batch.

Why a separate object: every value-dependent check of the boxes (finite, in their image,
not reversed, not empty after clipping) and every kernel table (clipped boxes in token
units, bin sizes, sample counts, image offsets, boxes grouped by image) depends on the
boxes alone. Computing them inside each loss call cost a device
sync to read the boxes, numpy work and a host-to-device copy per call, and made the call
impossible to capture in a CUDA graph. ``prepare_roi_geometry`` does all of it once,
with torch ops on the boxes' device and ONE device-to-host read (the checks' verdict and
the few sizes the launches need); the data path (collate, on the CPU in the loader: no
sync at all) hands the result to the op, whose call then only checks shapes and launches.

The geometry does not depend on the pooling, the loss or the sampling ratio: those stay
arguments of the call, so the collator, which does not know them, can prepare it.
Conventions (token layout, clipping, bin order) are the reference's
(medlvr/reference/roi_align.py); medlvr/kernels/roi_align_loss.py reads the tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medlvr.ops import _checks
from medlvr.reference.roi_align import bilinear_samples, clip_boxes

__all__ = ["RoiGeometry", "prepare_roi_geometry"]

# Tables, in buffer order, with their columns; rows are R boxes or I images.
#   geom_f (R 4) fp32 bits: x0, y0 (clipped box start, token units), bin_w, bin_h
#   geom_i (R 5): token offset of the box's image, H, W, adaptive bilinear samples along y, x
#   image_meta (I 3): token offset, H, W;  image_ptr (I+1): each image's slice of rows_by_image
#   rows_by_image (R): box rows sorted by image (stable)
#   counters (R·K + 1): zeros; the forward kernel's arrival counters, reset by the kernel
_LAYOUT = (("geom_f", 4), ("geom_i", 5), ("image_meta", 3), ("rows_by_image", 1), ("image_ptr", 1),
           ("counters", 1))


def _table_rows(sizes: tuple[int, int], bins: tuple[int, int]) -> dict:
    R, I = sizes
    return {"geom_f": R, "geom_i": R, "image_meta": I, "rows_by_image": R, "image_ptr": I + 1,
            "counters": R * bins[0] * bins[1] + 1}


def _aligned(n: int) -> int:
    """n int32 rounded up to 16 bytes: Triton specialises a kernel on whether each pointer
    is 16-byte aligned, so unaligned table starts would compile new variants as R varies."""
    return (n + 3) // 4 * 4


@dataclass(frozen=True, eq=False)
class RoiGeometry:
    """What ``roi_align_loss`` needs of the boxes of one batch, checked, on one device.

    Build it with :func:`prepare_roi_geometry`; move it with ``.to(device)`` (one copy:
    every table is a view of one int32 buffer). The Python ints and floats below were
    read once at preparation, so a call that uses the geometry reads nothing from the
    device. The forward kernel keeps arrival counters in the buffer (reset by the kernel
    itself), so two losses on one geometry must not run concurrently on two streams.
    """
    buffer: torch.Tensor = field(repr=False)  # int32, all tables (views in ``tables``)
    sizes: tuple[int, int]             # R boxes, I images
    bins: tuple[int, int]
    merge: int
    patch: int
    tokens_per_image: tuple[int, ...]  # merged tokens of each image (their sum is T)
    max_bin_w: float                   # widest bin, token units: sizes the load tiles
    grid_thw: torch.Tensor = field(repr=False)   # the inputs as given, for the reference
    boxes: torch.Tensor = field(repr=False)      # path (the kernels read only the tables)
    box_image: torch.Tensor = field(repr=False)
    tables: dict = field(init=False, repr=False)

    def __post_init__(self):
        rows = _table_rows(self.sizes, self.bins)
        tables, at = {}, 0
        for name, cols in _LAYOUT:
            n = rows[name] * cols
            tables[name] = self.buffer[at: at + n]
            at += _aligned(n)
        tables["geom_f"] = tables["geom_f"].view(torch.float32)
        object.__setattr__(self, "tables", tables)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def num_rois(self) -> int:
        return self.sizes[0]

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens_per_image)

    def _with_buffer(self, buffer: torch.Tensor) -> "RoiGeometry":
        return RoiGeometry(buffer, self.sizes, self.bins, self.merge, self.patch, self.tokens_per_image,
                           self.max_bin_w, self.grid_thw, self.boxes, self.box_image)

    def to(self, device, non_blocking: bool = False) -> "RoiGeometry":
        """The geometry on ``device``: one copy of the buffer (self when already there).

        The input tensors kept for the reference path stay where they are. accelerate's
        send_to_device and DataLoader(pin_memory=True) call this and ``pin_memory``."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.buffer.device == device:
            return self
        return self._with_buffer(self.buffer.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RoiGeometry":
        return self._with_buffer(self.buffer.pin_memory())


def check_bins(bins) -> tuple[int, int]:
    if not isinstance(bins, (tuple, list)) or len(bins) != 2:
        raise TypeError(f"bins must be a pair (gh, gw), got {bins!r}")
    return _checks.integer("bins[0] (gh)", bins[0], minimum=1), _checks.integer("bins[1] (gw)", bins[1], minimum=1)


def prepare_roi_geometry(grid_thw: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor, *,
                         bins: tuple[int, int], merge: int = 2, patch: int = 14) -> RoiGeometry:
    """Check the boxes of one batch and build the kernels' geometry, on the boxes' device.

    grid_thw (I 3) int, images only (t = 1), in patches; boxes (R 4) float, pixel
    (x0, y0, x1, y1) of the resized image; box_image (R) int; bins = (gh, gw). grid_thw
    and box_image are brought to the boxes' device. Raises ValueError naming the row for
    a grid row that is not an image of whole merged tokens, and for a box that is not
    finite, on an image out of range, reversed (x1 < x0 or y1 < y0), or empty after
    clipping to its image. Costs one device-to-host read when the boxes live on a GPU
    and none on the CPU: prepare in the data loader and move the result with
    ``.to(device)``.
    """
    _checks.tensor("grid_thw", grid_thw, dims=2)
    _checks.tensor("boxes", boxes, dims=2)
    _checks.tensor("box_image", box_image, dims=1)
    gh, gw = check_bins(bins)
    _checks.integer("merge", merge, minimum=1)
    _checks.integer("patch", patch, minimum=1)
    R = boxes.shape[0]
    if grid_thw.shape[1] != 3 or grid_thw.is_floating_point() or grid_thw.is_complex():
        raise ValueError(f"grid_thw must be an integer tensor (I, 3), got {grid_thw.dtype} {tuple(grid_thw.shape)}")
    if boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating tensor (R, 4) = ({R}, 4), got {boxes.dtype} {tuple(boxes.shape)}")
    if box_image.shape != (R,) or box_image.is_floating_point() or box_image.dtype == torch.bool:
        raise ValueError(f"box_image must be an integer tensor (R,) = ({R},), one image per box, got {box_image.dtype} "
                         f"{tuple(box_image.shape)}")
    dev = boxes.device
    grid = grid_thw.to(dev, torch.int64)
    img = box_image.to(dev, torch.int64)
    bx = boxes.detach().to(torch.float32)
    I, cell = grid.shape[0], merge * patch

    # --- every value check at once; one read of the verdicts below
    hw_px = grid[:, 1:]
    bad_grid = (grid[:, 0] != 1) | ((hw_px <= 0) | (hw_px % merge != 0)).any(1)
    HW = hw_px // merge  # merged tokens per image: rows H, columns W
    counts = grid[:, 0] * HW.prod(1)
    bad_image = (img < 0) | (img >= I)
    row_image = img.clamp(0, max(I - 1, 0))  # in range for the gathers; bad rows raise below
    hw = HW[row_image] if I else HW.new_zeros(R, 2)
    clipped = clip_boxes(bx, hw, cell)  # the reference's clipping, the same fp32 ops
    lo, hi = clipped[:, :2], clipped[:, 2:]  # (x, y) start and end, token units
    bin_w = (clipped[:, 2] - clipped[:, 0]) / gw  # as the reference's axis_weights: (hi − lo) / n_bins
    bin_h = (clipped[:, 3] - clipped[:, 1]) / gh
    widest = bin_w.max().reshape(1).double() if R else bin_w.new_zeros(1, dtype=torch.float64)
    verdict = [bad_grid, ~torch.isfinite(bx).all(1), bad_image, (bx[:, 2:] < bx[:, :2]).any(1), (hi <= lo).any(1),
               counts, widest]
    host = torch.cat(verdict).tolist()  # float64 by promotion; the one device-to-host read
    at = 0
    for name, n in (("grid_thw", I), ("not finite", R), ("box_image", R), ("reversed", R), ("empty", R)):
        if any(host[at: at + n]):
            _raise_bad_row(name, host[at: at + n].index(1.0), grid_thw, boxes, box_image, I=I, merge=merge,
                           cell=cell)
        at += n
    tokens_per_image = tuple(int(c) for c in host[at: at + I])

    # --- kernel tables (asynchronous on a GPU: no more reads), written into one buffer
    rows = _table_rows((R, I), (gh, gw))
    buffer = torch.zeros(sum(_aligned(rows[name] * cols) for name, cols in _LAYOUT), dtype=torch.int32, device=dev)
    geometry = RoiGeometry(buffer, (R, I), (gh, gw), merge, patch, tokens_per_image, host[-1], grid_thw, boxes,
                           box_image)
    t = geometry.tables
    offsets = counts.cumsum(0) - counts
    t["geom_f"].view(R, 4).copy_(torch.stack([clipped[:, 0], clipped[:, 1], bin_w, bin_h], 1))
    # adaptive bilinear samples, used when a call asks for sampling_ratio=-1
    ny = bilinear_samples(clipped[:, 1], clipped[:, 3], gh, -1, cell)
    nx = bilinear_samples(clipped[:, 0], clipped[:, 2], gw, -1, cell)
    t["geom_i"].view(R, 5).copy_(torch.stack([offsets[row_image], hw[:, 0], hw[:, 1], ny, nx], 1))
    t["image_meta"].view(I, 3).copy_(torch.cat([offsets[:, None], HW], 1))
    rows_by_image = torch.argsort(img, stable=True)
    t["rows_by_image"].copy_(rows_by_image)
    t["image_ptr"].copy_(torch.searchsorted(img[rows_by_image], torch.arange(I + 1, device=dev)))
    return geometry


def _raise_bad_row(check: str, r: int, grid_thw, boxes, box_image, *, I: int, merge: int, cell: int) -> None:
    """The ValueError of a failed check, naming row ``r`` (reads the row: failures only)."""
    if check == "grid_thw":
        t, h, w = grid_thw[r].tolist()
        if t != 1:
            raise ValueError(f"grid_thw row {r} = {(t, h, w)}: only images (t = 1) are supported; "
                             "a video's frames do not share one box")
        raise ValueError(f"grid_thw row {r} = {(t, h, w)}: h and w must be positive multiples of merge = {merge}")
    box = boxes[r].tolist()
    if check == "not finite":
        raise ValueError(f"boxes row {r} = {box} is not finite")
    i = int(box_image[r])
    if check == "box_image":
        raise ValueError(f"box_image row {r} = {i} is out of range for {I} images")
    if check == "reversed":
        raise ValueError(f"boxes row {r} = {box} has x1 < x0 or y1 < y0 (expected x0 <= x1, y0 <= y1)")
    _, h, w = (int(x) for x in grid_thw[i].tolist())
    raise ValueError(f"boxes row {r} = {box} is empty after clipping to image {i} "
                     f"({w // merge * cell} x {h // merge * cell} px)")
