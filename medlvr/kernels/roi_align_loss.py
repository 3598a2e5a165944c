"""Triton kernels of the ROI-pooled latent alignment loss (medlvr.ops.roi_align_loss).

The pooled targets are never written to memory. Every pass that needs a target
recomputes it, one (row, bin, D-slice) at a time, in registers (medlvr/kernels/roi_pooling.py:
the bin weights and the pooling). Latents and vision tokens may have different float
dtypes: both are read as fp32.

Launches (grid axis 1 splits D into BLOCK_D slices, for parallelism at small R·K):
  forward      ONE kernel. Per (row·bin, slice): partial z·t, z·z, t·t (cosine) or
               Σ(z − t)² (mse). The last slice program of a bin to arrive (an acq_rel
               arrival counter per bin) sums the bin's slices in slice order and writes
               the bin's sums and loss; the last bin to arrive (one more counter) sums
               the R·K losses in row order into the total. Which program arrives last
               varies, the order of every sum does not: the result is deterministic.
               The arriving program resets its counter, so the next call (or a CUDA
               graph replay) starts from zero without a memset launch.
  backward 1   per (row·bin, slice): recompute t; dz = A·t + B·z, and when the vision
               tokens need a gradient dt = C·z + E·t (fp32, shape of the latents: the
               gradient w.r.t. the targets, not the targets). A, B, C, E come from the
               three saved sums and dL/dloss (derivation in medlvr/ops/roi_align_loss.py),
               read through its strides (no copy of an expanded gradient).
  backward 2   per (16 tokens of one image, slice): dv = Σ over the boxes of the image of
               w(tokens, bins) @ dt[bins] (a [16, K] × [K, BLOCK_D] fp32 dot). This is a
               gather, not a scatter: each program owns its output rows and sums in a
               fixed order (boxes by index), so the backward is deterministic without
               atomics; tokens outside every box get zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from medlvr.kernels._common import lanes
from medlvr.kernels._device import on_device
from medlvr.kernels.roi_pooling import axis_weight, box_params, pooled_target


@triton.jit
def _bin_loss(s0, s1, s2, D, eps, COSINE: tl.constexpr):
    if COSINE:
        nz = tl.maximum(tl.sqrt(s1), eps)
        nt = tl.maximum(tl.sqrt(s2), eps)
        return 1.0 - s0 / (nz * nt)
    return s0 / D


@triton.jit(do_not_specialize=["n_rows"])
def _roi_loss_fwd_kernel(z_ptr, v_ptr, geom_f_ptr, geom_i_ptr, part_ptr, count_ptr, sums_ptr, loss_ptr, total_ptr,
                         n_rows, D, K, GW, sampling_ratio, scale, eps,
                         BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, AREA: tl.constexpr, COSINE: tl.constexpr):
    rk = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    n_slices = tl.num_programs(1)
    r = rk // K
    k = rk % K
    d, d_mask = lanes(sid * BLOCK_D, BLOCK_D, D)
    t = pooled_target(v_ptr, geom_f_ptr, geom_i_ptr, r, k // GW, k % GW, d, d_mask, D, sampling_ratio,
                       BLOCK_D, BLOCK_I, BLOCK_J, AREA)
    z = tl.load(z_ptr + rk * D + d, mask=d_mask, other=0.0).to(tl.float32)
    out = part_ptr + (rk * n_slices + sid) * 3
    if COSINE:
        tl.store(out + 0, tl.sum(z * t, axis=0))
        tl.store(out + 1, tl.sum(z * z, axis=0))
        tl.store(out + 2, tl.sum(t * t, axis=0))
    else:
        diff = z - t
        tl.store(out + 0, tl.sum(diff * diff, axis=0))
        tl.store(out + 1, 0.0)
        tl.store(out + 2, 0.0)
    # acq_rel: this program's partials are visible to whoever arrives last, and the last
    # one sees everyone's. Its loads go through L2 (.cg), never a stale L1 line.
    arrived = tl.atomic_add(count_ptr + rk, 1, sem="acq_rel")
    if arrived == n_slices - 1:
        tl.store(count_ptr + rk, 0)
        sl, s_mask = lanes(0, BLOCK_S, n_slices)
        base = part_ptr + (rk * n_slices + sl) * 3
        s0 = tl.sum(tl.load(base + 0, mask=s_mask, other=0.0, cache_modifier=".cg"), axis=0)
        s1 = tl.sum(tl.load(base + 1, mask=s_mask, other=0.0, cache_modifier=".cg"), axis=0)
        s2 = tl.sum(tl.load(base + 2, mask=s_mask, other=0.0, cache_modifier=".cg"), axis=0)
        tl.store(sums_ptr + rk * 3 + 0, s0)
        tl.store(sums_ptr + rk * 3 + 1, s1)
        tl.store(sums_ptr + rk * 3 + 2, s2)
        tl.store(loss_ptr + rk, _bin_loss(s0, s1, s2, D, eps, COSINE))
        done = tl.atomic_add(count_ptr + n_rows, 1, sem="acq_rel")
        if done == n_rows - 1:
            tl.store(count_ptr + n_rows, 0)
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for start in range(0, n_rows, BLOCK_R):
                rows = start + tl.arange(0, BLOCK_R)
                acc += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0, cache_modifier=".cg")
            tl.store(total_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _roi_loss_bwd_latent_kernel(z_ptr, v_ptr, geom_f_ptr, geom_i_ptr, sums_ptr, g_ptr, g_stride_r, g_stride_k,
                                g_scale, dz_ptr, dt_ptr, D, K, GW, sampling_ratio, eps,
                                BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                                AREA: tl.constexpr, COSINE: tl.constexpr,
                                WRITE_DZ: tl.constexpr, WRITE_DT: tl.constexpr):
    rk = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    r = rk // K
    k = rk % K
    d, d_mask = lanes(sid * BLOCK_D, BLOCK_D, D)
    # dL/dloss[r, k] through its strides: both 0 broadcast the scalar grad of "mean"/"sum"
    g = tl.load(g_ptr + r * g_stride_r + k * g_stride_k).to(tl.float32) * g_scale
    s0 = tl.load(sums_ptr + rk * 3 + 0)
    if COSINE:
        # dz = A·t + B·z, dt = A·z + E·t (the clamp at eps makes B, E vanish below it)
        rz = tl.sqrt(tl.load(sums_ptr + rk * 3 + 1))
        rt = tl.sqrt(tl.load(sums_ptr + rk * 3 + 2))
        nz = tl.maximum(rz, eps)
        nt = tl.maximum(rt, eps)
        a = -g / (nz * nt)
        b = tl.where(rz > eps, g * s0 / (nz * nz * nz * nt), 0.0)
        c = a
        e = tl.where(rt > eps, g * s0 / (nz * nt * nt * nt), 0.0)
    else:
        # dz = 2g/D·(z − t) = −dt
        b = 2.0 * g / D
        a = -b
        c = -b
        e = b
    t = pooled_target(v_ptr, geom_f_ptr, geom_i_ptr, r, k // GW, k % GW, d, d_mask, D, sampling_ratio,
                       BLOCK_D, BLOCK_I, BLOCK_J, AREA)
    z = tl.load(z_ptr + rk * D + d, mask=d_mask, other=0.0).to(tl.float32)
    if WRITE_DZ:
        tl.store(dz_ptr + rk * D + d, (a * t + b * z).to(dz_ptr.dtype.element_ty), mask=d_mask)
    if WRITE_DT:
        tl.store(dt_ptr + rk * D + d, c * z + e * t, mask=d_mask)


@triton.jit
def _roi_loss_bwd_vision_kernel(dt_ptr, dv_ptr, geom_f_ptr, geom_i_ptr, image_meta_ptr, rows_by_image_ptr,
                                image_ptr_ptr, blocks_per_image, D, K, GW, sampling_ratio, BLOCK_T: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, AREA: tl.constexpr):
    # one program: BLOCK_T consecutive tokens of one image × one D slice; axis 0 runs over
    # images × the largest image's blocks, and a block past its image's end does nothing
    b = tl.program_id(0) // blocks_per_image
    start = (tl.program_id(0) % blocks_per_image).to(tl.int64) * BLOCK_T
    sid = tl.program_id(1)
    off = tl.load(image_meta_ptr + b * 3 + 0).to(tl.int64)
    H = tl.load(image_meta_ptr + b * 3 + 1).to(tl.int64)
    W = tl.load(image_meta_ptr + b * 3 + 2).to(tl.int64)
    if start < H * W:
        local, t_mask = lanes(start, BLOCK_T, H * W)
        i = (local // W).to(tl.int32)
        j = (local % W).to(tl.int32)
        row_first = start // W
        row_last = tl.minimum(start + BLOCK_T - 1, H * W - 1) // W
        d, d_mask = lanes(sid * BLOCK_D, BLOCK_D, D)
        # all K bins of a box at once: bin k = p·GW + q (padded to BLOCK_K >= 16 for tl.dot)
        k, k_mask = lanes(0, BLOCK_K, K)
        p = k // GW
        q = k % GW
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        first = tl.load(image_ptr_ptr + b)
        last = tl.load(image_ptr_ptr + b + 1)
        for slot in range(first, last):
            r = tl.load(rows_by_image_ptr + slot)
            # token rows any bin of box r may weight: the clipped box's rows with a cell of
            # slack each side (both poolings; fp32 rounding of y0 + gh·bin_h at the far edge)
            y0 = tl.load(geom_f_ptr + r * 4 + 1)
            y_end = y0 + (K // GW) * tl.load(geom_f_ptr + r * 4 + 3)
            i_lo = tl.floor(y0).to(tl.int64) - 1
            i_hi = tl.floor(y_end).to(tl.int64) + 2
            if (row_last >= i_lo) & (row_first < i_hi):
                x_lo, y_lo, bin_w, bin_h, ny, nx = box_params(geom_f_ptr, geom_i_ptr, r, sampling_ratio, AREA)
                # w[token, bin]: the same weights the forward used, recomputed
                wy = axis_weight(i[:, None], (y_lo + p * bin_h)[None, :], bin_h, ny, H, AREA)
                wx = axis_weight(j[:, None], (x_lo + q * bin_w)[None, :], bin_w, nx, W, AREA)
                w = tl.where(t_mask[:, None] & k_mask[None, :], wy * wx, 0.0)
                rows = r.to(tl.int64) * K + k
                dt = tl.load(dt_ptr + rows[:, None] * D + d[None, :],
                             mask=k_mask[:, None] & d_mask[None, :], other=0.0)
                # dv[tokens] += w · dt[bins]; "ieee" keeps fp32 products (no TF32 rounding)
                acc += tl.dot(w, dt, input_precision="ieee")
        tok = off + local
        tl.store(dv_ptr + tok[:, None] * D + d[None, :], acc.to(dv_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- launchers

_TILE_TOKENS = 16  # tokens per tile: 16 × 512 fp32 = 64 registers a thread at 4 warps
BLOCK_T = 16  # tokens per program of the vision-gradient kernel (its tl.dot needs >= 16 rows)
_FINISH_BLOCK = 1024  # losses per step of the last program's row-order sum


def _block_d(D: int) -> int:
    # 512 lanes of fp32 per slice: 16-byte bf16 loads per thread at 4 warps, and
    # D = 3584 gives 7 slices of parallelism per bin.
    return min(triton.next_power_of_2(D), 512)


def _block_ij(max_cols: int) -> tuple[int, int]:
    # a tile spans the widest bin's columns (so one column step covers a bin) and as
    # many rows as fit in _TILE_TOKENS; wider bins loop over column chunks.
    block_j = min(triton.next_power_of_2(max(max_cols, 1)), _TILE_TOKENS)
    return _TILE_TOKENS // block_j, block_j


def roi_loss_forward(latents: torch.Tensor, vision_tokens: torch.Tensor, tables: dict, *, bins: tuple[int, int],
                     max_cols: int, sampling_ratio: int, area: bool, cosine: bool, eps: float, scale: float):
    """(per_bin (R K) fp32, total () fp32, sums (R·K, 3) fp32 saved for the backward).

    One launch (none when R = 0: the total is then a fresh 0). sums = (z·t, z·z, t·t)
    for cosine, (Σ(z−t)², 0, 0) for mse; total = scale · Σ per_bin. ``tables``: the
    RoiGeometry's, whose ``counters`` must be zero (the kernel leaves them so).
    """
    R, K, D = latents.shape
    n = R * K
    dev = latents.device
    if R == 0:
        return (torch.empty(0, K, device=dev, dtype=torch.float32), torch.zeros((), device=dev, dtype=torch.float32),
                torch.empty(0, 3, device=dev, dtype=torch.float32))
    block_d = _block_d(D)
    n_slices = triton.cdiv(D, block_d)
    # partials (n, slices, 3) | sums (n, 3) share one allocation (sums starts on 16 bytes:
    # Triton specialises on pointer alignment, and R varies from batch to batch); the
    # returned losses get their own, since autograd forbids in-place ops on an output that
    # is a view of a tensor made inside the Function
    n_part = (3 * n * n_slices + 3) // 4 * 4
    work = torch.empty(n_part + 3 * n, device=dev, dtype=torch.float32)
    part, sums = work[:n_part], work[n_part:].view(n, 3)
    per_bin = torch.empty(R, K, device=dev, dtype=torch.float32)
    total = torch.empty((), device=dev, dtype=torch.float32)
    block_i, block_j = _block_ij(max_cols)
    with on_device(latents):
        _roi_loss_fwd_kernel[(n, n_slices)](
            latents, vision_tokens, tables["geom_f"], tables["geom_i"], part, tables["counters"], sums, per_bin, total,
            n, D, K, bins[1], sampling_ratio, scale, eps,
            BLOCK_D=block_d, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_S=triton.next_power_of_2(n_slices),
            BLOCK_R=_FINISH_BLOCK, AREA=area, COSINE=cosine, num_warps=4)
    return per_bin, total, sums


def roi_loss_backward_latents(latents: torch.Tensor, vision_tokens: torch.Tensor, tables: dict, sums: torch.Tensor,
                              grad: torch.Tensor, *, grad_scale: float, bins: tuple[int, int], max_cols: int,
                              sampling_ratio: int, area: bool, cosine: bool, eps: float, want_dz: bool,
                              want_dt: bool):
    """dz (R K D) in the latents' dtype and dt (R K D) fp32, each or None. One launch.

    grad: dL/dloss, a scalar (broadcast to every bin) or (R K) of any strides; it is
    multiplied by ``grad_scale`` (1/(R·K) for "mean").
    """
    R, K, D = latents.shape
    dz = torch.empty_like(latents) if want_dz else None
    dt = torch.empty(R, K, D, device=latents.device, dtype=torch.float32) if want_dt else None
    if R and (want_dz or want_dt):
        block_d = _block_d(D)
        block_i, block_j = _block_ij(max_cols)
        stride_r, stride_k = (0, 0) if grad.dim() == 0 else grad.stride()
        with on_device(latents):
            _roi_loss_bwd_latent_kernel[(R * K, triton.cdiv(D, block_d))](
                latents, vision_tokens, tables["geom_f"], tables["geom_i"], sums, grad, stride_r, stride_k,
                grad_scale, dz if want_dz else latents, dt if want_dt else sums, D, K, bins[1], sampling_ratio, eps,
                BLOCK_D=block_d, BLOCK_I=block_i, BLOCK_J=block_j, AREA=area, COSINE=cosine,
                WRITE_DZ=want_dz, WRITE_DT=want_dt, num_warps=4)
    return dz, dt


def roi_loss_backward_vision(dt: torch.Tensor, vision_tokens: torch.Tensor, tables: dict, *, bins: tuple[int, int],
                             max_image_tokens: int, sampling_ratio: int, area: bool) -> torch.Tensor:
    """dv (T D) in the vision tokens' dtype: every token written once (zeros outside boxes). One launch.

    max_image_tokens: the largest image's token count (sizes the launch grid)."""
    T, D = vision_tokens.shape
    gh, gw = bins
    n_images = tables["image_meta"].numel() // 3
    dv = torch.empty_like(vision_tokens)
    if T:
        block_d = max(16, min(triton.next_power_of_2(D), 256))
        per_image = triton.cdiv(max_image_tokens, BLOCK_T)
        with on_device(dt):
            _roi_loss_bwd_vision_kernel[(n_images * per_image, triton.cdiv(D, block_d))](
                dt, dv, tables["geom_f"], tables["geom_i"], tables["image_meta"], tables["rows_by_image"],
                tables["image_ptr"], per_image, D, gh * gw, gw, sampling_ratio, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
                BLOCK_K=max(16, triton.next_power_of_2(gh * gw)), AREA=area, num_warps=4)
    return dv
