"""Reference ROI-pooled latent alignment loss (stage 1 of MedLVR): the executable spec.

Shapes (R boxes, K = gh·gw bins, D hidden, T packed vision tokens, I images):

    latents        (R K D)   one latent state per bin, bins row-major over the box
    vision_tokens  (T D)     the vision tower's output after the 2×2 merger, packed per image
    grid_thw       (I 3)     (t, h, w) of each image in *patches*, as Qwen2.5-VL's processor gives it
    boxes          (R 4)     (x0, y0, x1, y1) in pixels of the resized image fed to the vision tower
    box_image      (R)       which image each box belongs to

Token layout (checked against transformers' Qwen2.5-VL: the merger output is put back in
raster order by ``reverse_indices``; ``get_rope_index`` uses llm_grid_h = h // merge):
image b contributes H·W tokens, H = h // merge, W = w // merge, row-major (token (i, j)
at offset_b + i·W + j), and token (i, j) covers pixels [j·c, (j+1)·c) × [i·c, (i+1)·c)
with c = merge·patch (28). Only images (t = 1) are accepted: a video's frames have no
single box, so a t > 1 grid is rejected by the op instead of guessing a pooling over time.

Boxes are clipped to the image; the clipped box, in token units, is split into gh rows
× gw columns of equal bins; bin k = p·gw + q is row p, column q (row-major). Both
poolings are separable, target[p, q] = Σ_ij wy[p, i] · wx[q, j] · v[i, j]:

- ``area``: wy[p, i] = |[i, i+1) ∩ [lo_p, lo_p + s)| / s, the overlap-area-weighted mean
  of the token cells the bin covers (lo_p = y0 + p·s, s = bin height).
- ``bilinear``: RoIAlign with aligned=True on the token grid (spatial_scale = 1/c), i.e.
  torchvision.ops.roi_align: ns samples per bin and axis at lo_p + (n + ½)·s/ns (with the
  −½ pixel-centre shift), each bilinearly interpolated, averaged. A bilinear sample's
  weight is a product of a y and an x factor, so its average is too.

Loss per (row, bin): ``cosine`` 1 − z·t / (max(|z|, ε)·max(|t|, ε)), ε = 1e-8; ``mse``
mean over D of (z − t)². Reduction over all R·K terms: ``mean`` (0 when R = 0: a batch
with no ROI adds no alignment term), ``sum``, ``none`` → (R K). Computed in fp32, or in
fp64 when the latents or the vision tokens are fp64 (the fp64 rule of
medlvr/ops/_checks.py: clipped boxes, bin weights, targets and loss all in fp64); the
target carries gradient to the vision tokens unless ``detach_target``. The bilinear sample
count stays torchvision's fp32 rule in both: it is an integer convention, not a precision.
"""
from __future__ import annotations

import torch

COS_EPS = 1e-8


def clip_boxes(boxes: torch.Tensor, grid_hw: torch.Tensor, cell: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boxes (R 4) in pixels clipped to their image (grid_hw (R 2): token rows, cols), in token
    units, computed in ``dtype`` (fp32: what the kernels' tables hold; fp64 for fp64 calls)."""
    b = boxes.to(dtype) / cell
    limit = grid_hw.flip(1).to(dtype).repeat(1, 2)  # (w, h, w, h) per box
    return b.clamp(min=0).minimum(limit)


def axis_weights(lo: float, hi: float, n_bins: int, size: int, *, pooling: str, samples: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_bins, size) weights of the token rows (or columns) for each bin along one axis, in
    ``dtype`` (fp32, or fp64 for an fp64 call).

    lo, hi: the clipped box extent in token units along this axis. ``samples`` is the
    number of bilinear samples per bin along this axis (ignored for ``area``).
    """
    p = torch.arange(n_bins, dtype=dtype)[:, None]
    if pooling == "area":
        # bin edges in ``dtype``: fp32 edges are computed as the kernels compute them, so
        # that both agree on sub-pixel bins where fp32 rounding of the edges is a visible
        # part of the width
        idx = torch.arange(size, dtype=dtype)[None, :]
        lo_t = torch.tensor(lo, dtype=dtype)
        s = (torch.tensor(hi, dtype=dtype) - lo_t) / n_bins
        a = lo_t + p * s
        b = a + s
        overlap = (torch.minimum(idx + 1, b) - torch.maximum(idx, a)).clamp(min=0)
        return overlap / (b - a)
    # bilinear, aligned=True: coordinates shift by half a cell so that the sample at a
    # cell's centre reads that cell alone (torchvision's roi_align_kernel.cpp, in fp64 here)
    s = (hi - lo) / n_bins
    n = torch.arange(samples, dtype=torch.float64)[None, :]
    y = (lo - 0.5) + p.double() * s + (n + 0.5) * s / samples       # (n_bins, samples)
    valid = (y >= -1.0) & (y <= size)                                # else the sample reads 0
    y = y.clamp(min=0.0)
    low = y.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, 0.0, y - low)
    idx = torch.arange(size)[None, None, :]
    w = ((idx == low[..., None]) * (1.0 - frac)[..., None] + (idx == high[..., None]) * frac[..., None])
    return (w * valid[..., None]).sum(1).div(samples).to(dtype)


def bilinear_samples(lo, hi, n_bins: int, sampling_ratio: int, cell: int) -> torch.Tensor:
    """Samples per bin along one axis (int64 tensor): torchvision's rule (adaptive when sampling_ratio <= 0).

    lo, hi: the clipped box extent in token units (Python floats or fp32 tensors of one
    shape, on any device: medlvr.ops.roi_geometry evaluates it for all boxes at once). The
    adaptive count ceil(extent / n_bins) is evaluated in fp32 exactly as torchvision's
    roi_align (aligned=True) evaluates it from pixel coordinates: (hi_px·s − 0.5) −
    (lo_px·s − 0.5) with s = fp32(1/cell). On a box whose extent is a whole number of bins
    that fp32 value can exceed the integer by one ulp and ceil then takes one more sample;
    matching it is what makes `bilinear` equal torchvision's result on every box. (A
    Python scalar operand of an fp32 tensor op is rounded to fp32 first, so each line
    below is one fp32 operation.)
    """
    lo32 = torch.as_tensor(lo, dtype=torch.float32)
    hi32 = torch.as_tensor(hi, dtype=torch.float32, device=lo32.device)
    if sampling_ratio > 0:
        return torch.full(torch.broadcast_shapes(lo32.shape, hi32.shape), sampling_ratio, dtype=torch.int64,
                          device=lo32.device)
    start = (lo32 * float(cell)) * (1.0 / cell) - 0.5
    end = (hi32 * float(cell)) * (1.0 / cell) - 0.5
    return torch.ceil((end - start) / n_bins).clamp(min=1).to(torch.int64)


def roi_pool_targets_ref(vision_tokens: torch.Tensor, grid_thw: torch.Tensor, boxes: torch.Tensor,
                         box_image: torch.Tensor, *, bins: tuple[int, int], pooling: str = "area",
                         merge: int = 2, patch: int = 14, sampling_ratio: int = 2,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled targets (R K D), materialised (the fast path never does this), computed in
    ``dtype``: by default fp64 for fp64 vision tokens, else fp32.

    Differentiable w.r.t. vision_tokens. Inputs are assumed valid (the op checks them).
    """
    gh, gw = bins
    cell = merge * patch
    if dtype is None:
        dtype = torch.float64 if vision_tokens.dtype == torch.float64 else torch.float32
    grid = grid_thw.to("cpu", torch.int64)
    hw = grid[:, 1:] // merge
    counts = grid[:, 0] * hw[:, 0] * hw[:, 1]
    offsets = torch.cumsum(counts, 0) - counts
    img = box_image.to("cpu", torch.int64)
    clipped = clip_boxes(boxes.detach().to("cpu"), hw[img], cell, dtype)
    v = vision_tokens.to(dtype)
    out = []
    for r in range(boxes.shape[0]):
        b = int(img[r])
        h, w = int(hw[b, 0]), int(hw[b, 1])
        x0, y0, x1, y1 = (float(c) for c in clipped[r])
        ny = int(bilinear_samples(y0, y1, gh, sampling_ratio, cell))
        nx = int(bilinear_samples(x0, x1, gw, sampling_ratio, cell))
        wy = axis_weights(y0, y1, gh, h, pooling=pooling, samples=ny, dtype=dtype).to(v.device)
        wx = axis_weights(x0, x1, gw, w, pooling=pooling, samples=nx, dtype=dtype).to(v.device)
        tokens = v[int(offsets[b]): int(offsets[b]) + h * w]
        # (K, h·w) weights of every token for every bin, k = p·gw + q: outer products
        weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(gh * gw, h * w)
        out.append(weights @ tokens)
    if not out:
        # no box: an empty result that still belongs to v's graph (its gradient is zero)
        return v[:0].unsqueeze(1).expand(0, gh * gw, v.shape[1])
    return torch.stack(out)


def per_bin_loss(z: torch.Tensor, t: torch.Tensor, loss: str) -> torch.Tensor:
    """(…, D) latents and targets of one dtype (fp32, or fp64) → (…) loss per bin."""
    if loss == "cosine":
        nz = torch.linalg.vector_norm(z, dim=-1).clamp(min=COS_EPS)
        nt = torch.linalg.vector_norm(t, dim=-1).clamp(min=COS_EPS)
        return 1.0 - (z * t).sum(-1) / (nz * nt)
    return (z - t).pow(2).mean(-1)


def reduce_loss(per_bin: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_bin
    total = per_bin.sum()
    if reduction == "sum":
        return total
    # mean over R·K terms; an empty batch (no ROI) gives 0, never 0/0.
    return total / max(per_bin.numel(), 1)


def roi_align_loss_ref(latents: torch.Tensor, vision_tokens: torch.Tensor, grid_thw: torch.Tensor,
                       boxes: torch.Tensor, box_image: torch.Tensor, *, bins: tuple[int, int],
                       pooling: str = "area", loss: str = "cosine", reduction: str = "mean",
                       detach_target: bool = True, merge: int = 2, patch: int = 14,
                       sampling_ratio: int = 2) -> torch.Tensor:
    """fp32 loss (fp64 when an input is fp64): a scalar, or (R K) for reduction='none'. See
    the module docstring.

    latents and vision_tokens may have different float dtypes; both are computed in fp32
    (fp64 when either is fp64), also under torch.autocast (which would otherwise run the
    pooling matmul in bf16), and each gradient comes back in its input's dtype.
    """
    acc = torch.float64 if torch.float64 in (latents.dtype, vision_tokens.dtype) else torch.float32
    with torch.autocast(latents.device.type, enabled=False):
        v = vision_tokens.detach() if detach_target else vision_tokens
        t = roi_pool_targets_ref(v, grid_thw, boxes, box_image, bins=bins, pooling=pooling,
                                 merge=merge, patch=patch, sampling_ratio=sampling_ratio, dtype=acc)
        return reduce_loss(per_bin_loss(latents.to(acc), t, loss), reduction)
