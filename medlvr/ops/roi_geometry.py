"""Box geometry of one batch for ``roi_align_loss``, prepared once per batch.

Why a separate object: every value-dependent check of the boxes (finite, in their image,
not reversed, not empty after clipping) and every kernel table (clipped boxes in token
units, bin sizes, sample counts, image offsets, the vision-gradient kernel's token
blocks) depends on the boxes alone. Computing them inside each loss call cost a device
sync to read the boxes, numpy work and a host-to-device copy per call, and made the call
impossible to capture in a CUDA graph. ``prepare_roi_geometry`` does all of it once,
with torch ops on the boxes' device and ONE device-to-host read (the checks' verdict and
the few sizes the launches need); the data path (collate, on the CPU in the loader: no
sync at all) hands the result to the op, whose call then only checks shapes and launches.

The geometry does not depend on the pooling, the loss or the sampling ratio: those stay
arguments of the call, so the collator, which does not know them, can prepare it.
Conventions (token layout, clipping, bin order) are the reference's
(medlvr/reference/roi_align.py); the tables' meaning is in kernels/roi_align_loss.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medlvr.reference.roi_align import bilinear_samples, clip_boxes

__all__ = ["RoiGeometry", "prepare_roi_geometry"]

# Tokens per program of the vision-gradient kernel (its tl.dot needs >= 16 rows); the
# token blocks of the tables are cut to this size and never straddle two images.
BLOCK_TOKENS = 16

# Tables, in buffer order, with their columns; rows are R boxes, I images or NB blocks.
#   geom_f (R 4) fp32 bits: x0, y0 (clipped box start, token units), bin_w, bin_h
#   geom_i (R 5): token offset of the box's image, H, W, adaptive bilinear samples along y, x
#   extent (R 2): i_lo, i_hi, a superset of the token rows any bin of the box weights
#   image_meta (I 3): token offset, H, W;  image_ptr (I+1): each image's slice of rows_by_image
#   rows_by_image (R): box rows sorted by image (stable);  block_image, block_start (NB)
#   counters (R·K + 1): zeros; the forward kernel's arrival counters, reset by the kernel
_LAYOUT = (("geom_f", 4), ("geom_i", 5), ("extent", 2), ("image_meta", 3), ("rows_by_image", 1),
           ("image_ptr", 1), ("block_image", 1), ("block_start", 1), ("counters", 1))


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
    sizes: tuple[int, int, int]        # R boxes, I images, NB vision-gradient blocks
    bins: tuple[int, int]
    merge: int
    patch: int
    tokens_per_image: tuple[int, ...]  # merged tokens of each image (their sum is T)
    max_bin_w: float                   # widest bin, token units: sizes the load tiles
    grid_thw: torch.Tensor = field(repr=False)   # the inputs as given: for the reference
    boxes: torch.Tensor = field(repr=False)      # path and the memory floor, never read by
    box_image: torch.Tensor = field(repr=False)  # the kernels
    tables: dict = field(init=False, repr=False)

    def __post_init__(self):
        R, I, NB = self.sizes
        K = self.bins[0] * self.bins[1]
        rows = {"geom_f": R, "geom_i": R, "extent": R, "image_meta": I, "rows_by_image": R, "image_ptr": I + 1,
                "block_image": NB, "block_start": NB, "counters": R * K + 1}
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


def _check_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bins(bins) -> tuple[int, int]:
    if not isinstance(bins, (tuple, list)) or len(bins) != 2:
        raise TypeError(f"bins must be a pair (gh, gw), got {bins!r}")
    return check_int("bins[0] (gh)", bins[0]), check_int("bins[1] (gw)", bins[1])


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
    _check_tensor("grid_thw", grid_thw, 2)
    _check_tensor("boxes", boxes, 2)
    _check_tensor("box_image", box_image, 1)
    gh, gw = check_bins(bins)
    check_int("merge", merge)
    check_int("patch", patch)
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
    t, h, w = grid.unbind(1)
    bad_grid = (t != 1) | (h <= 0) | (w <= 0) | (h % merge != 0) | (w % merge != 0)
    H, W = h // merge, w // merge
    counts = t * H * W
    not_finite = ~torch.isfinite(bx).all(1)
    bad_image = (img < 0) | (img >= I)
    reversed_ = (bx[:, 2] < bx[:, 0]) | (bx[:, 3] < bx[:, 1])
    row_image = img.clamp(0, max(I - 1, 0))  # in range for the gathers; bad rows raise below
    hw = torch.stack([H, W], 1)[row_image] if I else torch.zeros(R, 2, dtype=torch.int64, device=dev)
    x0, y0, x1, y1 = clip_boxes(bx, hw, cell).unbind(1)  # the reference's clipping, same fp32 ops
    empty = (x1 <= x0) | (y1 <= y0)
    bin_w = (x1 - x0) / gw  # as the reference's axis_weights: (hi − lo) / n_bins in fp32
    bin_h = (y1 - y0) / gh
    widest = bin_w.max().reshape(1) if R else bin_w.new_zeros(1)
    verdict = [counts, bad_grid, not_finite, bad_image, reversed_, empty, widest]
    host = torch.cat([x.to(torch.float64) for x in verdict]).cpu()  # the one device-to-host read
    counts_h, bad_grid_h, not_finite_h, bad_image_h, reversed_h, empty_h = host[:-1].split([I, I, R, R, R, R])
    _raise_first_bad_row(grid_thw, boxes, box_image, bad_grid_h, not_finite_h, bad_image_h, reversed_h, empty_h,
                         I=I, merge=merge, cell=cell)
    tokens_per_image = tuple(int(c) for c in counts_h.tolist())

    # --- kernel tables (asynchronous on a GPU: no more reads)
    H_r, W_r = hw.unbind(1)
    offsets = counts.cumsum(0) - counts
    ny = bilinear_samples(y0, y1, gh, -1, cell)  # used when the call asks for sampling_ratio=-1
    nx = bilinear_samples(x0, x1, gw, -1, cell)
    # rows any bin may weight, with a cell of slack each side for both poolings and for
    # fp32 rounding at the box's far edge (the vision-gradient kernel skips other boxes)
    i_lo = (y0.floor() - 1).clamp(min=0).to(torch.int64)
    i_hi = torch.minimum(y1.floor().to(torch.int64) + 2, H_r)
    per_image = (counts + BLOCK_TOKENS - 1) // BLOCK_TOKENS
    n_blocks = sum((c + BLOCK_TOKENS - 1) // BLOCK_TOKENS for c in tokens_per_image)
    block_image = torch.repeat_interleave(torch.arange(I, device=dev), per_image, output_size=n_blocks)
    first_block = per_image.cumsum(0) - per_image
    block_start = (torch.arange(n_blocks, device=dev) - first_block[block_image]) * BLOCK_TOKENS
    rows_by_image = torch.argsort(img, stable=True)
    image_ptr = torch.searchsorted(img[rows_by_image], torch.arange(I + 1, device=dev))
    parts = {
        "geom_f": torch.stack([x0, y0, bin_w, bin_h], 1).view(torch.int32),
        "geom_i": torch.stack([offsets[row_image], H_r, W_r, ny, nx], 1),
        "extent": torch.stack([i_lo, i_hi], 1),
        "image_meta": torch.stack([offsets, H, W], 1),
        "rows_by_image": rows_by_image,
        "image_ptr": image_ptr,
        "block_image": block_image,
        "block_start": block_start,
        "counters": torch.zeros(R * gh * gw + 1, dtype=torch.int32, device=dev),
    }
    flat = [parts[name].reshape(-1).to(torch.int32) for name, _ in _LAYOUT]
    pad = torch.zeros(3, dtype=torch.int32, device=dev)
    buffer = torch.cat([x for f in flat for x in (f, pad[: _aligned(f.numel()) - f.numel()])])
    return RoiGeometry(buffer, (R, I, n_blocks), (gh, gw), merge, patch, tokens_per_image, float(host[-1]),
                       grid_thw, boxes, box_image)


def _raise_first_bad_row(grid_thw, boxes, box_image, bad_grid, not_finite, bad_image, reversed_, empty, *,
                         I: int, merge: int, cell: int) -> None:
    """The ValueError of the first failed check, naming the row (only reads more on failure)."""
    if bool(bad_grid.any()):
        b = int(bad_grid.nonzero()[0])
        t, h, w = grid_thw[b].tolist()
        if t != 1:
            raise ValueError(f"grid_thw row {b} = {(t, h, w)}: only images (t = 1) are supported; "
                             "a video's frames do not share one box")
        raise ValueError(f"grid_thw row {b} = {(t, h, w)}: h and w must be positive multiples of merge = {merge}")
    if bool(not_finite.any()):
        r = int(not_finite.nonzero()[0])
        raise ValueError(f"boxes row {r} = {boxes[r].tolist()} is not finite")
    if bool(bad_image.any()):
        r = int(bad_image.nonzero()[0])
        raise ValueError(f"box_image row {r} = {int(box_image[r])} is out of range for {I} images")
    if bool(reversed_.any()):
        r = int(reversed_.nonzero()[0])
        raise ValueError(f"boxes row {r} = {boxes[r].tolist()} has x1 < x0 or y1 < y0 (expected x0 <= x1, y0 <= y1)")
    if bool(empty.any()):
        r = int(empty.nonzero()[0])
        i = int(box_image[r])
        _, h, w = (int(x) for x in grid_thw[i].tolist())
        raise ValueError(f"boxes row {r} = {boxes[r].tolist()} is empty after clipping to image {i} "
                         f"({w // merge * cell} x {h // merge * cell} px)")
