"""Final RMSNorm of the last hidden state written straight into the next latent step's
input-embedding buffer, and the residual add + RMSNorm of the decoder layers
(add_rmsnorm). Raw kernels and launchers only: checks and dispatch are in
medlvr.ops.decode.

A latent step feeds back e_t = norm(h_{t-1}); unfused that is ~7 launches (cast, pow,
mean, rsqrt, mul, cast, mul) plus a copy into the static input buffer and, for per-sample
exits, a where(). Here one program reads a row of `hidden` once and writes it once.

Numerics follow HF Qwen2RMSNorm exactly (transformers 5.24):
    x  = hidden.float(); x = x * rsqrt(mean(x^2) + eps)
    y  = weight * x.to(hidden.dtype)          # rounded to hidden's dtype BEFORE the weight
so the kernel rounds to HIDDEN dtype, multiplies by the weight in fp32 (what torch does
for a bf16*bf16 product) and rounds to promote(weight, hidden) (RES dtype) before the
store casts to the out buffer's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from medlvr.kernels._common import cast_rne, lanes
from medlvr.kernels._device import on_device


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _rmsnorm_feedback_kernel(
    h_ptr, w_ptr, out_ptr, active_ptr,
    sh_b, sh_d, so_b, so_d,
    eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ACTIVE: tl.constexpr, RES: tl.constexpr,
    EMU: tl.constexpr,
):
    # One program per row: D <= a few thousand (3584 for Qwen2.5-VL-7B), so the whole
    # row lives in registers and is read from HBM exactly once.
    b = tl.program_id(0).to(tl.int64)
    d, dm = lanes(0, BLOCK_D, D)
    x = tl.load(h_ptr + b * sh_b + d * sh_d, mask=dm, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / D
    # sqrt_rn + div_rn: IEEE-rounded like torch.rsqrt on CPU, not the approximate rsqrt
    # instruction; one scalar per row, so the precise version costs nothing.
    r = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    n = cast_rne(xf * r, x.dtype, EMU)
    w = tl.load(w_ptr + d, mask=dm, other=0.0)
    y = cast_rne(w.to(tl.float32) * n.to(tl.float32), RES, EMU)
    mask = dm
    if HAS_ACTIVE:
        # Finished samples keep whatever the buffer holds (their last latent): a masked
        # store, no branch on the host.
        mask = mask & (tl.load(active_ptr + b) != 0)
    tl.store(out_ptr + b * so_b + d * so_d, cast_rne(y, out_ptr.dtype.element_ty, EMU), mask=mask)


def rmsnorm_feedback(hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, out: torch.Tensor,
                     active: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; arguments were validated by medlvr.ops.decode.rmsnorm_feedback."""
    B, D = hidden.shape
    weight = weight.contiguous()  # indexed densely by the kernel; a no-op normally
    if active is not None:
        active = active.contiguous()
    block_d = triton.next_power_of_2(D)
    res = torch.promote_types(hidden.dtype, weight.dtype)
    with on_device(hidden):
        _rmsnorm_feedback_kernel[(B,)](
            hidden, weight, out, active if active is not None else out,
            *hidden.stride(), *out.stride(),
            eps,
            D=D, BLOCK_D=block_d, HAS_ACTIVE=active is not None, RES=_TL[res], EMU=hidden.device.type != "cuda",
            # ~16 elements per thread: 4096-wide rows (D=3584) get 8 warps.
            num_warps=max(1, min(16, block_d // 512)),
        )
    return out


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    sx_b, sx_d, sr_b, sr_d, so_b, so_d, sn_b, sn_d,
    eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, SUM: tl.constexpr, RES: tl.constexpr, EMU: tl.constexpr,
):
    # A decoder layer's residual add and the next RMSNorm in one pass: the row of x and
    # of the residual is read once, the new residual and the normed row written once
    # (unfused: the add reads 2 rows and writes 1, the norm reads that row again).
    b = tl.program_id(0).to(tl.int64)
    d, dm = lanes(0, BLOCK_D, D)
    x = tl.load(x_ptr + b * sx_b + d * sx_d, mask=dm, other=0.0)
    r = tl.load(r_ptr + b * sr_b + d * sr_d, mask=dm, other=0.0)
    # torch adds two half-precision tensors in fp32 and rounds once to the promoted dtype
    # (SUM): the same here, so the new residual equals `residual + x` bit for bit.
    s = cast_rne(r.to(tl.float32) + x.to(tl.float32), SUM, EMU)
    tl.store(res_out_ptr + b * sn_b + d * sn_d, s, mask=dm)
    # Then rmsnorm_feedback's math on the rounded sum (see the module docstring).
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / D
    rinv = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    n = cast_rne(sf * rinv, SUM, EMU)
    w = tl.load(w_ptr + d, mask=dm, other=0.0)
    y = cast_rne(w.to(tl.float32) * n.to(tl.float32), RES, EMU)
    tl.store(out_ptr + b * so_b + d * so_d, y, mask=dm)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, *,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments were validated by medlvr.ops.decode.add_rmsnorm."""
    B, D = x.shape
    weight = weight.contiguous()
    sum_dt = torch.promote_types(residual.dtype, x.dtype)
    res_dt = torch.promote_types(sum_dt, weight.dtype)
    new_residual = torch.empty((B, D), dtype=sum_dt, device=x.device)
    normed = torch.empty((B, D), dtype=res_dt, device=x.device)
    block_d = triton.next_power_of_2(D)
    with on_device(x):
        _add_rmsnorm_kernel[(B,)](
            x, residual, weight, normed, new_residual,
            *x.stride(), *residual.stride(), *normed.stride(), *new_residual.stride(),
            eps,
            D=D, BLOCK_D=block_d, SUM=_TL[sum_dt], RES=_TL[res_dt], EMU=x.device.type != "cuda",
            num_warps=max(1, min(16, block_d // 512)),  # as rmsnorm_feedback: ~16 elements per thread
        )
    return normed, new_residual
