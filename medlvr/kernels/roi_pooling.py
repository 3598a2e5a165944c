"""The ROI-pooled target of one (box row, bin, D slice), recomputed in registers by every
kernel of medlvr/kernels/roi_align_loss.py that needs it (the targets are never stored):

    t[r, k, d] = Σ_ij wy(i) · wx(j) · v[off_r + i·W_r + j, d]

The bin weights are separable (see medlvr/reference/roi_align.py), so wy and wx are
computed from four scalars of the box and never stored either. Each inner step loads a
tile of up to 16 of the bin's tokens × BLOCK_D, every token row contiguous along D
(coalesced), and reduces it with the weights. Vision tokens of any float dtype are read
as fp32.

Geometry: the tables of medlvr.ops.roi_geometry.RoiGeometry (one int32 buffer prepared
once per batch; meaning of each table there); the few values derived from them (bin
origins, the rows a box may touch) are recomputed here. All coordinates are in token
units; the tables hold the clipped box, and the −½ pixel-centre shift of bilinear pooling
is applied here (one fp32 subtraction, the same rounding as the reference's).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def axis_weight(idx, lo, size_bin, n_samples, extent, AREA: tl.constexpr):
    """Weight of token row/col ``idx`` in the bin [lo, lo + size_bin) along one axis.

    ``idx`` and ``lo`` may be scalars or vectors (they broadcast). ``extent`` is the
    image's token count along the axis. The bilinear branch follows torchvision's
    bilinear_interpolate (aligned=True) sample by sample, divided by the sample count.
    """
    f = idx * 1.0  # int → fp32; also accepts the interpreter's plain-int loop indices
    if AREA:
        # |[f, f+1) ∩ [lo, hi)| / (hi − lo): dividing by the rounded width hi − lo, not
        # by s, makes a bin inside one cell weigh exactly 1 even when s is far below
        # the fp32 spacing of lo (a sub-pixel box far from the origin)
        hi = lo + size_bin
        ov = tl.minimum(f + 1.0, hi) - tl.maximum(f, lo)
        return tl.maximum(ov, 0.0) / (hi - lo)
    else:
        ext_f = extent.to(tl.float32)
        last = extent - 1
        step = size_bin / n_samples
        w = (f + lo) * 0.0
        for s in range(n_samples):
            y = lo + (s + 0.5) * step
            # a sample outside [-1, extent] reads nothing (torchvision returns 0 for it)
            keep = tl.where(y >= -1.0, 1.0, 0.0) * tl.where(y <= ext_f, 1.0, 0.0)
            y = tl.maximum(y, 0.0)
            low = y.to(tl.int32)  # y >= 0: truncation is floor
            at_edge = low >= last
            low = tl.where(at_edge, last, low)
            high = tl.where(at_edge, last, low + 1)
            frac = tl.where(at_edge, 0.0, y - low.to(tl.float32))
            w += tl.where(idx == low, keep * (1.0 - frac), 0.0)
            w += tl.where(idx == high, keep * frac, 0.0)
        return w / n_samples


@triton.jit
def box_params(geom_f_ptr, geom_i_ptr, r, sampling_ratio, AREA: tl.constexpr):
    """Bin origin (x, y), bin size (w, h) and bilinear samples (y, x) of box row ``r``.

    The tables hold the clipped box; bilinear pooling (aligned=True) puts pixel centres
    at half-integers of the token grid, hence the −½. A positive ``sampling_ratio`` is
    the samples per bin and axis; otherwise the table's adaptive counts are used.
    """
    x_lo = tl.load(geom_f_ptr + r * 4 + 0)
    y_lo = tl.load(geom_f_ptr + r * 4 + 1)
    bin_w = tl.load(geom_f_ptr + r * 4 + 2)
    bin_h = tl.load(geom_f_ptr + r * 4 + 3)
    if AREA:
        ny = 1
        nx = 1
    else:
        x_lo = x_lo - 0.5
        y_lo = y_lo - 0.5
        ny = tl.where(sampling_ratio > 0, sampling_ratio, tl.load(geom_i_ptr + r * 5 + 3))
        nx = tl.where(sampling_ratio > 0, sampling_ratio, tl.load(geom_i_ptr + r * 5 + 4))
    return x_lo, y_lo, bin_w, bin_h, ny, nx


@triton.jit
def pooled_target(v_ptr, geom_f_ptr, geom_i_ptr, r, p, q, d, d_mask, D, sampling_ratio,
                   BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                   AREA: tl.constexpr):
    """Target slice t[r, bin (p, q), d] in fp32, accumulated in registers.

    The bin's tokens are visited in tiles of BLOCK_I rows × BLOCK_J columns, flattened
    to BLOCK_I·BLOCK_J token rows of ``v`` (each contiguous along D), so one masked
    load brings up to 16 tokens' slices in flight at once.
    """
    x_lo, y_lo, bin_w, bin_h, ny, nx = box_params(geom_f_ptr, geom_i_ptr, r, sampling_ratio, AREA)
    off = tl.load(geom_i_ptr + r * 5 + 0).to(tl.int64)
    H = tl.load(geom_i_ptr + r * 5 + 1)
    W = tl.load(geom_i_ptr + r * 5 + 2).to(tl.int64)
    ylo = y_lo + p * bin_h
    xlo = x_lo + q * bin_w
    if AREA:
        # cells overlapping [lo, lo + s); lo >= 0 after clipping
        i0 = tl.floor(ylo).to(tl.int32)
        i1 = tl.minimum(tl.ceil(ylo + bin_h).to(tl.int32), H.to(tl.int32))
        j0 = tl.floor(xlo).to(tl.int32)
        j1 = tl.minimum(tl.ceil(xlo + bin_w).to(tl.int32), W.to(tl.int32))
    else:
        # samples lie in [lo, lo + s]; each reads floor(y) and floor(y) + 1
        i0 = tl.floor(tl.maximum(ylo, 0.0)).to(tl.int32)
        i1 = tl.minimum(tl.floor(tl.maximum(ylo + bin_h, 0.0)).to(tl.int32) + 2, H.to(tl.int32))
        j0 = tl.floor(tl.maximum(xlo, 0.0)).to(tl.int32)
        j1 = tl.minimum(tl.floor(tl.maximum(xlo + bin_w, 0.0)).to(tl.int32) + 2, W.to(tl.int32))
    m = tl.arange(0, BLOCK_I * BLOCK_J)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_start in range(i0, i1, BLOCK_I):
        ii = i_start + m // BLOCK_J
        wy = axis_weight(ii, ylo, bin_h, ny, H, AREA)
        for j_start in range(j0, j1, BLOCK_J):
            jj = j_start + m % BLOCK_J
            tok_mask = (ii < i1) & (jj < j1)
            w = tl.where(tok_mask, wy * axis_weight(jj, xlo, bin_w, nx, W, AREA), 0.0)
            tok = off + ii * W + jj  # W is int64: offsets are widened before * D
            tile = tl.load(v_ptr + tok[:, None] * D + d[None, :],
                           mask=tok_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * tile, axis=0)
    return acc
