"""ROI-pooled latent alignment loss: argument checks, autograd, dispatch.

``roi_align_loss`` pools the vision tokens inside each ROI box into K = gh·gw bin
targets and compares them with the K latent states. The reference
(medlvr/reference/roi_align.py) is the spec and holds the conventions: token packing,
bin order (row-major over the box), pooling and loss formulas. The Triton path
(medlvr.kernels.roi_align_loss) never materialises the targets.

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

from dataclasses import dataclass

import numpy as np
import torch

from medlvr import _backend
from medlvr.reference.roi_align import (COS_EPS, axis_weights, bilinear_samples, clip_boxes,
                                        roi_align_loss_ref)

__all__ = ["roi_align_loss", "roi_align_loss_memory_floor"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POOLINGS = ("area", "bilinear")
_LOSSES = ("cosine", "mse")
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- checks

def _check_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_side_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    # boxes and grids are small: they may stay on the CPU (no device sync to read them)
    if x.device.type != "cpu" and x.device != device:
        raise ValueError(f"{name} must be on the CPU or on {device} (the latents' device), got {x.device}")


@dataclass(frozen=True)
class _Plan:
    """Everything the kernels need, derived from validated inputs on the host."""
    geom: dict      # GEOMETRY_FIELDS -> views of one int32 device buffer (one copy)
    max_cols: int   # widest column span of any bin, in tokens


def _validate(latents, vision_tokens, grid_thw, boxes, box_image, bins, pooling, loss, reduction,
              merge, patch, sampling_ratio):
    """Raise TypeError/ValueError for bad input; return numpy (grid, box image ids, clipped boxes, tokens per image)."""
    _check_tensor("latents", latents, 3)
    _check_tensor("vision_tokens", vision_tokens, 2)
    _check_tensor("grid_thw", grid_thw, 2)
    _check_tensor("boxes", boxes, 2)
    _check_tensor("box_image", box_image, 1)
    if latents.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"latents must be one of {_FLOAT_DTYPES}, got {latents.dtype}")
    if vision_tokens.dtype != latents.dtype:
        raise TypeError(f"vision_tokens must have the latents' dtype {latents.dtype}, got {vision_tokens.dtype}")
    if vision_tokens.device != latents.device:
        raise ValueError(f"vision_tokens must be on the latents' device {latents.device}, got {vision_tokens.device}")
    for name, x in (("grid_thw", grid_thw), ("boxes", boxes), ("box_image", box_image)):
        _check_side_device(name, x, latents.device)
    if not isinstance(bins, (tuple, list)) or len(bins) != 2:
        raise TypeError(f"bins must be a pair (gh, gw), got {bins!r}")
    gh = _check_int("bins[0] (gh)", bins[0])
    gw = _check_int("bins[1] (gw)", bins[1])
    _check_choice("pooling", pooling, _POOLINGS)
    _check_choice("loss", loss, _LOSSES)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_int("merge", merge)
    _check_int("patch", patch)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    if sampling_ratio != -1 and sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive int or -1 (adaptive), got {sampling_ratio}")

    R, K, D = latents.shape
    if K != gh * gw:
        raise ValueError(f"latents has K = {K} latent states per box, but bins = ({gh}, {gw}) needs K = {gh * gw}")
    if D == 0:
        raise ValueError(f"latents must have a hidden size D >= 1, got shape {tuple(latents.shape)}")
    if vision_tokens.shape[1] != D:
        raise ValueError(f"vision_tokens must have D = {D} columns like latents, got shape {tuple(vision_tokens.shape)}")
    if grid_thw.shape[1] != 3 or grid_thw.is_floating_point() or grid_thw.is_complex():
        raise ValueError(f"grid_thw must be an integer tensor (I, 3), got {grid_thw.dtype} {tuple(grid_thw.shape)}")
    if boxes.shape != (R, 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating tensor (R, 4) = ({R}, 4), got {boxes.dtype} {tuple(boxes.shape)}")
    if box_image.shape != (R,) or box_image.is_floating_point() or box_image.dtype == torch.bool:
        raise ValueError(f"box_image must be an integer tensor (R,) = ({R},), got {box_image.dtype} {tuple(box_image.shape)}")

    # Box and grid checks run in numpy on host copies: R and I are small, and numpy's
    # per-call cost (~1 µs) keeps the host time of a GPU call far below torch's CPU ops.
    grid = grid_thw.detach().to("cpu", torch.int64).numpy()
    for b, (t, h, w) in enumerate(grid.tolist()):
        if t != 1:
            raise ValueError(f"grid_thw row {b} = {(t, h, w)}: only images (t = 1) are supported; "
                             "a video's frames do not share one box")
        if h <= 0 or w <= 0 or h % merge or w % merge:
            raise ValueError(f"grid_thw row {b} = {(t, h, w)}: h and w must be positive multiples of merge = {merge}")
    counts = grid[:, 0] * (grid[:, 1] // merge) * (grid[:, 2] // merge)
    if int(counts.sum()) != vision_tokens.shape[0]:
        raise ValueError(f"grid_thw adds up to {int(counts.sum())} merged tokens "
                         f"(per image {counts.tolist()}), but vision_tokens has T = {vision_tokens.shape[0]}")

    bx = boxes.detach().to("cpu", torch.float32).numpy()
    img = box_image.detach().to("cpu", torch.int64).numpy()
    n_images = grid.shape[0]
    for r in np.flatnonzero(~np.isfinite(bx).all(1)).tolist():
        raise ValueError(f"boxes row {r} = {bx[r].tolist()} is not finite")
    for r in np.flatnonzero((img < 0) | (img >= n_images)).tolist():
        raise ValueError(f"box_image row {r} = {int(img[r])} is out of range for {n_images} images")
    for r in np.flatnonzero((bx[:, 2] < bx[:, 0]) | (bx[:, 3] < bx[:, 1])).tolist():
        raise ValueError(f"boxes row {r} = {bx[r].tolist()} has x1 < x0 or y1 < y0 (expected x0 <= x1, y0 <= y1)")
    hw = grid[:, 1:] // merge
    # the reference's clip_boxes, in the same fp32 operations
    b = bx / np.float32(merge * patch)
    h, w = hw[img, 0].astype(np.float32), hw[img, 1].astype(np.float32)
    clipped = np.stack([np.minimum(np.maximum(b[:, 0], 0), w), np.minimum(np.maximum(b[:, 1], 0), h),
                        np.minimum(np.maximum(b[:, 2], 0), w), np.minimum(np.maximum(b[:, 3], 0), h)], 1)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    for r in np.flatnonzero(empty).tolist():
        i = int(img[r])
        raise ValueError(f"boxes row {r} = {bx[r].tolist()} is empty after clipping to image {i} "
                         f"({int(hw[i, 1]) * merge * patch} x {int(hw[i, 0]) * merge * patch} px)")
    return grid, img, clipped, counts


def _plan(grid, img, clipped, counts, *, bins, pooling, merge, patch, sampling_ratio, device) -> _Plan:
    """Kernel geometry (numpy on the host, one int32 buffer, one copy to ``device``)."""
    from medlvr.kernels.roi_align_loss import BLOCK_T, GEOMETRY_FIELDS

    gh, gw = bins
    hw = grid[:, 1:] // merge
    offsets = np.cumsum(counts) - counts
    x0, y0, x1, y1 = clipped.T
    bin_w = (x1 - x0) / np.float32(gw)
    bin_h = (y1 - y0) / np.float32(gh)
    R = len(img)
    if pooling == "bilinear":
        # torchvision's sample count, evaluated in fp32 the way torchvision does
        ny = np.broadcast_to(bilinear_samples(y0, y1, gh, sampling_ratio, merge * patch), (R,))
        nx = np.broadcast_to(bilinear_samples(x0, x1, gw, sampling_ratio, merge * patch), (R,))
        # aligned=True: pixel centres sit at half-integers of the token grid
        start_x, start_y = x0 - np.float32(0.5), y0 - np.float32(0.5)
        max_cols = int((np.floor(bin_w) + 3).max()) if R else 1
    else:
        ny = nx = np.ones(R, dtype=np.int64)
        start_x, start_y = x0, y0
        max_cols = int((np.ceil(bin_w) + 1).max()) if R else 1
    H, W = hw[img, 0], hw[img, 1]
    # rows any bin may weight, with a cell of slack each side for both poolings and for
    # fp32 rounding at the box's far edge (the vision-gradient kernel skips other boxes)
    i_lo = np.maximum(np.floor(y0) - 1, 0).astype(np.int64)
    i_hi = np.minimum(np.floor(y1).astype(np.int64) + 2, H)
    # 16-token blocks of the vision-gradient kernel never straddle two images
    per_image = (counts + BLOCK_T - 1) // BLOCK_T
    block_image = np.repeat(np.arange(len(counts)), per_image)
    block_start = (np.arange(len(block_image)) - (np.cumsum(per_image) - per_image)[block_image]) * BLOCK_T
    image_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    image_ptr[1:] = np.cumsum(np.bincount(img, minlength=len(counts)))
    fields = {
        "geom_f": np.stack([start_x, start_y, bin_w, bin_h], 1).astype(np.float32).view(np.int32),
        "geom_i": np.stack([offsets[img], H, W, ny, nx], 1),
        "extent": np.stack([i_lo, i_hi], 1),
        "image_meta": np.stack([offsets, hw[:, 0], hw[:, 1]], 1),
        "rows_by_image": np.argsort(img, kind="stable"),
        "image_ptr": image_ptr,
        "block_image": block_image,
        "block_start": block_start,
    }
    flat = [fields[name].reshape(-1).astype(np.int32) for name in GEOMETRY_FIELDS]
    buf = torch.from_numpy(np.concatenate(flat)).to(device)  # one host-to-device copy
    geom, at = {}, 0
    for name, part in zip(GEOMETRY_FIELDS, flat):
        geom[name] = buf[at: at + part.size]
        at += part.size
    geom["geom_f"] = geom["geom_f"].view(torch.float32)
    return _Plan(geom, max_cols)


# ----------------------------------------------------------------------------- autograd

class _RoiAlignLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, vision_tokens, plan: _Plan, bins, pooling, loss, reduction):
        from medlvr.kernels import roi_align_loss as kern

        R, K, D = latents.shape
        area, cosine = pooling == "area", loss == "cosine"
        per_bin, total, sums = kern.roi_loss_forward(latents, vision_tokens, plan.geom, bins=bins,
                                                     max_cols=plan.max_cols, area=area, cosine=cosine,
                                                     eps=COS_EPS, mean=reduction == "mean")
        ctx.save_for_backward(latents, vision_tokens, sums)
        ctx.plan, ctx.bins, ctx.area, ctx.cosine, ctx.reduction = plan, bins, area, cosine, reduction
        return per_bin.view(R, K) if reduction == "none" else total

    @staticmethod
    def backward(ctx, grad_out):
        from medlvr.kernels import roi_align_loss as kern

        latents, vision_tokens, sums = ctx.saved_tensors
        R, K, D = latents.shape
        want_dz, want_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad_out.to(torch.float32)
        grad = grad.reshape(R * K).contiguous() if ctx.reduction == "none" else grad.reshape(())
        scale = 1.0 / (R * K) if ctx.reduction == "mean" and R else 1.0
        dz, dt = kern.roi_loss_backward_latents(latents, vision_tokens, ctx.plan.geom, sums, grad, grad_scale=scale,
                                                bins=ctx.bins, max_cols=ctx.plan.max_cols, area=ctx.area,
                                                cosine=ctx.cosine, eps=COS_EPS, want_dz=want_dz, want_dt=want_dv)
        dv = None
        if want_dv:
            dv = kern.roi_loss_backward_vision(dt, vision_tokens, ctx.plan.geom, bins=ctx.bins, area=ctx.area)
        return dz, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- public

def roi_align_loss(latents: torch.Tensor, vision_tokens: torch.Tensor, grid_thw: torch.Tensor,
                   boxes: torch.Tensor, box_image: torch.Tensor, *, bins: tuple[int, int],
                   pooling: str = "area", loss: str = "cosine", reduction: str = "mean",
                   detach_target: bool = True, merge: int = 2, patch: int = 14,
                   sampling_ratio: int = 2) -> torch.Tensor:
    """ROI alignment loss between latent states and pooled vision tokens (fp32).

    latents (R K D), vision_tokens (T D) of the same float dtype (fp32/fp16/bf16) and
    device; grid_thw (I 3) int, images only (t = 1), in patches; boxes (R 4) pixel
    (x0, y0, x1, y1) of the resized image; box_image (R) int. grid_thw, boxes and
    box_image may live on the CPU (reading them then costs no device sync).
    bins = (gh, gw) with gh·gw = K, bins row-major over the box (k = p·gw + q).
    pooling: "area" (overlap-weighted mean of token cells) or "bilinear" (RoIAlign,
    aligned=True, ``sampling_ratio`` samples per bin and axis, -1 = adaptive).
    loss: "cosine" (1 − cos) or "mse" (mean over D). reduction: "mean" over R·K (0 for
    R = 0), "sum", or "none" → (R K). detach_target=False also sends gradient to
    vision_tokens. Boxes are clipped to their image; a box empty after clipping, a
    reversed box, or an image index out of range raises ValueError naming the row.
    """
    grid, img, clipped, counts = _validate(latents, vision_tokens, grid_thw, boxes, box_image, bins,
                                           pooling, loss, reduction, merge, patch, sampling_ratio)
    bins = (int(bins[0]), int(bins[1]))
    backend = _backend.choose(latents.device, has_ext=False, has_triton=True)
    if backend == "reference":
        return roi_align_loss_ref(latents, vision_tokens, torch.from_numpy(grid), boxes.detach().cpu(),
                                  torch.from_numpy(img), bins=bins,
                                  pooling=pooling, loss=loss, reduction=reduction,
                                  detach_target=detach_target, merge=merge, patch=patch,
                                  sampling_ratio=sampling_ratio)
    plan = _plan(grid, img, clipped, counts, bins=bins, pooling=pooling, merge=merge, patch=patch,
                 sampling_ratio=sampling_ratio, device=latents.device)
    v = vision_tokens.detach() if detach_target else vision_tokens
    return _RoiAlignLoss.apply(latents.contiguous(), v.contiguous(), plan, bins, pooling, loss, reduction)


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

