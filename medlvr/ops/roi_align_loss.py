"""ROI-pooled latent alignment loss, and the pooled targets themselves: argument checks,
autograd, dispatch.

``roi_align_loss`` pools the vision tokens inside each ROI box into K = gh·gw bin
targets and compares them with the K latent states. The reference
(medlvr/reference/roi_align.py) is the spec and holds the conventions: token packing,
bin order (row-major over the box), pooling and loss formulas. The Triton path
(medlvr.kernels.roi_align_loss) never materialises the targets. ``roi_pool_targets``
returns them (stage 1's teacher-forced latent inputs, medlvr/train/sft/roi.py).

Backward math (per row r, bin k, with g = dL/dloss[r, k] from the reduction):
  cosine  L = 1 − d / (nz·nt), d = z·t, nz = max(|z|, ε), nt = max(|t|, ε)
          dL/dz = −t / (nz·nt) + d·z / (nz³·nt)   (second term only where |z| > ε:
          below ε the clamp makes nz a constant)
          dL/dt = −z / (nz·nt) + d·t / (nz·nt³)   (likewise where |t| > ε)
  mse     L = Σ(z − t)² / D: dL/dz = 2(z − t)/D = −dL/dt
so dz = A·t + B·z and dt = C·z + E·t with per-(r, k) scalars A, B, C, E that the
backward kernel computes itself from the three sums the forward saved (z·t, |z|², |t|²)
and dL/dloss: it recomputes t and needs nothing else, and no host-side torch op runs
between the kernels.
"""
from __future__ import annotations

import math

import torch

from medlvr.ops import _checks
from medlvr.ops.roi_geometry import RoiGeometry, check_bins, prepare_roi_geometry
from medlvr.reference.roi_align import (COS_EPS, axis_weights, bilinear_samples, clip_boxes, roi_align_loss_ref,
                                        roi_pool_targets_ref)

__all__ = ["RoiGeometry", "prepare_roi_geometry", "roi_align_loss", "roi_align_loss_memory_floor", "roi_pool_targets"]

_FLOAT_DTYPES = _checks.FLOAT_DTYPES  # fp64 too: computed in fp64 by the reference (fp64 rule, _checks)
_POOLINGS = ("area", "bilinear")
_LOSSES = ("cosine", "mse")
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- checks

def _checked_geometry(geometry, bins, merge, patch) -> RoiGeometry:
    """The call's geometry, and the optional bins / merge / patch checked against it."""
    if geometry is None:
        raise TypeError("roi_align_loss needs geometry=prepare_roi_geometry(grid_thw, boxes, box_image, bins=...)")
    if not isinstance(geometry, RoiGeometry):
        raise TypeError(f"geometry must be a RoiGeometry (prepare_roi_geometry), got {type(geometry).__name__}")
    if bins is not None and check_bins(bins) != geometry.bins:
        raise ValueError(f"bins = {tuple(bins)} differs from the geometry's bins {geometry.bins}")
    for name, value, have in (("merge", merge, geometry.merge), ("patch", patch, geometry.patch)):
        if value is not None and value != have:
            raise ValueError(f"{name} = {value!r} differs from the geometry's {name} = {have}")
    return geometry


def _check_sampling_ratio(sampling_ratio) -> None:
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    if sampling_ratio != -1 and sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive int or -1 (adaptive), got {sampling_ratio}")


def _check_token_count(geometry: RoiGeometry, vision_tokens: torch.Tensor) -> None:
    if geometry.n_tokens != vision_tokens.shape[0]:
        raise ValueError(f"grid_thw adds up to {geometry.n_tokens} merged tokens (per image "
                         f"{list(geometry.tokens_per_image)}), but vision_tokens has T = {vision_tokens.shape[0]}")


def _check_call(latents, vision_tokens, geometry: RoiGeometry, pooling, loss, reduction, sampling_ratio) -> None:
    """Shape/dtype/device checks of one call: Python ints only, nothing read from a device."""
    _checks.tensor("latents", latents, dims=3, dtypes=_FLOAT_DTYPES)
    _checks.tensor("vision_tokens", vision_tokens, dims=2, dtypes=_FLOAT_DTYPES)
    if vision_tokens.device != latents.device:
        raise ValueError(f"vision_tokens must be on the latents' device {latents.device}, got {vision_tokens.device}")
    _checks.choice("pooling", pooling, _POOLINGS)
    _checks.choice("loss", loss, _LOSSES)
    _checks.choice("reduction", reduction, _REDUCTIONS)
    _check_sampling_ratio(sampling_ratio)
    R, K, D = latents.shape
    gh, gw = geometry.bins
    if K != gh * gw:
        raise ValueError(f"latents has K = {K} latent states per box, but bins = ({gh}, {gw}) needs K = {gh * gw}")
    if R != geometry.num_rois:
        raise ValueError(f"latents has R = {R} rows, but there are {geometry.num_rois} boxes")
    if D == 0:
        raise ValueError(f"latents must have a hidden size D >= 1, got shape {tuple(latents.shape)}")
    if vision_tokens.shape[1] != D:
        raise ValueError(f"vision_tokens must have D = {D} columns like latents, got shape {tuple(vision_tokens.shape)}")
    _check_token_count(geometry, vision_tokens)


# ----------------------------------------------------------------------------- autograd

class _RoiAlignLoss(torch.autograd.Function):
    """Forward one launch, backward one (+ one for the vision tokens' gradient).

    Nothing here reads a device value or copies host data: with a prepared geometry the
    call is asynchronous and can be captured in a CUDA graph."""

    @staticmethod
    def forward(ctx, latents, vision_tokens, geometry: RoiGeometry, pooling, loss, reduction, sampling_ratio):
        from medlvr.kernels import roi_align_loss as kern

        R, K, D = latents.shape
        area, cosine = pooling == "area", loss == "cosine"
        # the widest bin's column span (a tile-shape hint; any value is correct): area
        # overlaps ceil(w) + 1 cells at most, bilinear samples read floor(w) + 3
        w = geometry.max_bin_w
        max_cols = (math.ceil(w) + 1) if area else (math.floor(w) + 3)
        sr = sampling_ratio if not area else 1
        per_bin, total, sums = kern.roi_loss_forward(
            latents, vision_tokens, geometry.tables, bins=geometry.bins, max_cols=max_cols, sampling_ratio=sr,
            area=area, cosine=cosine, eps=COS_EPS, scale=1.0 / (R * K) if reduction == "mean" and R else 1.0)
        ctx.save_for_backward(latents, vision_tokens, sums)
        ctx.geometry, ctx.max_cols, ctx.sr, ctx.area, ctx.cosine, ctx.reduction = (geometry, max_cols, sr, area,
                                                                                   cosine, reduction)
        return per_bin if reduction == "none" else total

    @staticmethod
    def backward(ctx, grad_out):
        from medlvr.kernels import roi_align_loss as kern

        latents, vision_tokens, sums = ctx.saved_tensors
        R, K, D = latents.shape
        geometry = ctx.geometry
        want_dz, want_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / (R * K) if ctx.reduction == "mean" and R else 1.0
        dz, dt = kern.roi_loss_backward_latents(
            latents, vision_tokens, geometry.tables, sums, grad_out, grad_scale=scale, bins=geometry.bins,
            max_cols=ctx.max_cols, sampling_ratio=ctx.sr, area=ctx.area, cosine=ctx.cosine, eps=COS_EPS,
            want_dz=want_dz, want_dt=want_dv)
        dv = None
        if want_dv:
            dv = kern.roi_loss_backward_vision(dt, vision_tokens, geometry.tables, bins=geometry.bins,
                                               max_image_tokens=max(geometry.tokens_per_image, default=0),
                                               sampling_ratio=ctx.sr, area=ctx.area)
        return dz, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- public

def roi_align_loss(latents: torch.Tensor, vision_tokens: torch.Tensor, *, geometry: RoiGeometry | None = None,
                   bins: tuple[int, int] | None = None,
                   pooling: str = "area", loss: str = "cosine", reduction: str = "mean",
                   detach_target: bool = True, merge: int | None = None, patch: int | None = None,
                   sampling_ratio: int = 2) -> torch.Tensor:
    """ROI alignment loss between latent states and pooled vision tokens (fp32).

    latents (R K D), vision_tokens (T D) on one device, each fp32, fp16, bf16 or fp64: the
    two dtypes may differ (under bf16 autocast the vision tokens arrive bf16 while latents
    made outside it stay fp32). Both are read as fp32 and every sum is fp32; the loss is
    fp32 and each gradient comes back in its own input's dtype. fp64 rule
    (medlvr/ops/_checks.py): a call with an fp64 input goes to the reference, which
    computes boxes, bin weights, targets and loss in fp64 and returns an fp64 loss;
    forcing the fp32 Triton backend on it is a TypeError naming the argument.

    geometry=prepare_roi_geometry(grid_thw, boxes, box_image, bins=..., merge=, patch=): the
    boxes (pixels of the resized image) checked and laid out once per batch (the data path
    does it on the CPU and moves it with ``.to(device)``). The call then reads nothing from
    the device and copies nothing to it: no sync, and it can be captured in a CUDA graph
    (backward too). bins / merge / patch, when given, must equal the geometry's.
    bins = (gh, gw) with gh·gw = K, bins row-major over the box (k = p·gw + q).
    pooling: "area" (overlap-weighted mean of token cells) or "bilinear" (RoIAlign,
    aligned=True, ``sampling_ratio`` samples per bin and axis, -1 = adaptive).
    loss: "cosine" (1 − cos) or "mse" (mean over D). reduction: "mean" over R·K (0 for
    R = 0), "sum", or "none" → (R K). detach_target=False also sends gradient to
    vision_tokens. Boxes are clipped to their image; a box empty after clipping, a
    reversed box, or an image index out of range raises ValueError naming the row (when
    the geometry is prepared).
    """
    geometry = _checked_geometry(geometry, bins, merge, patch)
    _check_call(latents, vision_tokens, geometry, pooling, loss, reduction, sampling_ratio)
    backend = _checks.backend("roi_align_loss", latents.device, has_triton=True, latents=latents,
                              vision_tokens=vision_tokens)
    if backend == "reference":
        return roi_align_loss_ref(latents, vision_tokens, geometry.grid_thw, geometry.boxes, geometry.box_image,
                                  bins=geometry.bins, pooling=pooling, loss=loss, reduction=reduction,
                                  detach_target=detach_target, merge=geometry.merge, patch=geometry.patch,
                                  sampling_ratio=sampling_ratio)
    if geometry.device != latents.device:
        raise ValueError(f"geometry is on {geometry.device}, the latents on {latents.device}: move it once per "
                         "batch with geometry.to(device)")
    v = vision_tokens.detach() if detach_target else vision_tokens
    return _RoiAlignLoss.apply(latents.contiguous(), v.contiguous(), geometry, pooling, loss, reduction,
                               sampling_ratio)


def roi_pool_targets(vision_tokens: torch.Tensor, grid_thw: torch.Tensor, boxes: torch.Tensor,
                     box_image: torch.Tensor, *, bins: tuple[int, int], pooling: str = "area", merge: int = 2,
                     patch: int = 14, sampling_ratio: int = 2) -> torch.Tensor:
    """The pooled ROI targets (R K D), materialised: fp32 (fp64 for fp64 vision tokens).

    vision_tokens (T D) any float dtype; grid_thw (I 3), boxes (R 4), box_image (R) and
    bins, pooling, merge, patch, sampling_ratio as for :func:`roi_align_loss` (the same
    conventions: bins row-major over the box, boxes in pixels of the resized image, clipped
    to it). Every argument is checked first, the boxes' values included
    (:func:`prepare_roi_geometry`: one device-to-host read when they live on a GPU), with a
    ValueError / TypeError naming the argument or the row. Differentiable w.r.t.
    vision_tokens.

    Computed in fp32 also under ``torch.autocast`` (which would run the pooling matmul in
    its 16-bit dtype), like the loss. Dispatch: no fast path materialises the targets (the
    Triton kernels recompute them in registers and never store them), so every device runs
    the reference backend, medlvr.reference.roi_align.roi_pool_targets_ref; results are
    bit-identical to calling it directly (outside autocast).
    """
    _checks.tensor("vision_tokens", vision_tokens, dims=2, dtypes=_FLOAT_DTYPES)
    _checks.choice("pooling", pooling, _POOLINGS)
    _check_sampling_ratio(sampling_ratio)
    geometry = prepare_roi_geometry(grid_thw, boxes, box_image, bins=bins, merge=merge, patch=patch)
    _check_token_count(geometry, vision_tokens)
    # no ext / Triton kernel: "reference" on every device, and a forced other backend raises
    # here (medlvr/_backend.py: never a silent fallback)
    _checks.backend("roi_pool_targets", vision_tokens.device, vision_tokens=vision_tokens)
    with torch.autocast(vision_tokens.device.type, enabled=False):
        return roi_pool_targets_ref(vision_tokens, grid_thw, boxes, box_image, bins=geometry.bins, pooling=pooling,
                                    merge=merge, patch=patch, sampling_ratio=sampling_ratio)


def roi_align_loss_memory_floor(vision_tokens: torch.Tensor, grid_thw: torch.Tensor, boxes: torch.Tensor,
                                box_image: torch.Tensor, *, bins: tuple[int, int], pooling: str = "area",
                                merge: int = 2, patch: int = 14, sampling_ratio: int = 2,
                                latent_dtype: torch.dtype | None = None, detach_target: bool = True) -> dict:
    """Bytes any implementation must move, for the benchmark's "fraction of the floor".

    forward:  read the latents once and every vision token some bin weights, once.
    backward: read them again (the autograd split forbids keeping the targets, which
              would cost more than re-reading) and write d latents; with
              detach_target=False also write d vision_tokens for all T tokens.
    Returns {"forward": bytes, "backward": bytes, "forward_backward": bytes, "tokens_in_boxes": n}.
    """
    gh, gw = bins
    D = vision_tokens.shape[1]
    v_el = vision_tokens.element_size()
    z_el = torch.empty(0, dtype=latent_dtype or vision_tokens.dtype).element_size()
    grid = grid_thw.to("cpu", torch.int64)
    hw = grid[:, 1:] // merge
    img = box_image.to("cpu", torch.int64)
    clipped = clip_boxes(boxes.detach().to("cpu", torch.float32), hw[img], merge * patch)
    touched = [torch.zeros(int(h), int(w), dtype=torch.bool) for h, w in hw.tolist()]
    for r in range(clipped.shape[0]):
        b = int(img[r])
        x0, y0, x1, y1 = (float(c) for c in clipped[r])
        h, w = touched[b].shape
        wy = axis_weights(y0, y1, gh, h, pooling=pooling, samples=int(bilinear_samples(y0, y1, gh, sampling_ratio, merge * patch)))
        wx = axis_weights(x0, x1, gw, w, pooling=pooling, samples=int(bilinear_samples(x0, x1, gw, sampling_ratio, merge * patch)))
        touched[b] |= (wy.sum(0) > 0)[:, None] & (wx.sum(0) > 0)[None, :]
    n_in = int(sum(int(m.sum()) for m in touched))
    latent_bytes = clipped.shape[0] * gh * gw * D * z_el
    fwd = latent_bytes + n_in * D * v_el
    bwd = 2 * latent_bytes + n_in * D * v_el
    if not detach_target:
        bwd += vision_tokens.shape[0] * D * v_el
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd, "tokens_in_boxes": n_in}

