"""Fused rotary embedding (plain RoPE or Qwen2.5-VL mRoPE) + KV-cache append for one
decode step. Raw kernel and launcher only: checks and dispatch are in medlvr.ops.decode.

One step of one sample touches Hq + 2 * Hkv rows of Dh values: a few KB. The work is
latency-bound, so the goal is one launch instead of HF's ~15 small ops (cos/sin table,
section gather, rotate_half cats, index_copy into the cache), with no host sync so a
CUDA graph can hold it.

Layout (rotate_half, HF convention, not interleaved): with half = rotary_dim / 2,
    out[j]        = x[j] * cos[j] - x[j + half] * sin[j]          j < half
    out[j + half] = x[j + half] * cos[j] + x[j] * sin[j]
dims >= rotary_dim pass through unchanged.
mRoPE (transformers 5.24, Qwen2_5_VLRotaryEmbedding.recomposition_frequencies): the
half-dim is cut into chunks of sizes (s0, s1, s2); chunk i takes its angle from
position row i (temporal, height, width), and both halves share the angle of j.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from medlvr.kernels._common import cast_rne, lanes
from medlvr.kernels._device import on_device
from triton.language.extra import libdevice


@triton.jit
def _cos_sin(pos_ptr, inv_freq_ptr, b, spos_r, spos_b, j, jm, SEC0: tl.constexpr, SEC01: tl.constexpr,
             MROPE: tl.constexpr, PRECISE_TRIG: tl.constexpr):
    """cos and sin of the rotary angle of dims j of sample b."""
    # Angle of dim j: position * inv_freq[j] in fp32, exactly HF's
    # position_ids.float() * inv_freq (one correctly rounded product).
    inv = tl.load(inv_freq_ptr + j, mask=jm, other=0.0).to(tl.float32)
    if MROPE:
        p_t = tl.load(pos_ptr + b * spos_b).to(tl.float32)
        p_h = tl.load(pos_ptr + spos_r + b * spos_b).to(tl.float32)
        p_w = tl.load(pos_ptr + 2 * spos_r + b * spos_b).to(tl.float32)
        pos = tl.where(j < SEC0, p_t, tl.where(j < SEC01, p_h, p_w))
    else:
        pos = tl.load(pos_ptr + b * spos_b).to(tl.float32)
    ang = pos * inv
    if PRECISE_TRIG:
        # tl.cos/tl.sin may lower to the approximate PTX instructions, whose error grows
        # with |angle|; positions reach 10^4+ rad, so use libdevice's full range reduction.
        c = libdevice.cos(ang)
        s = libdevice.sin(ang)
    else:  # the CPU interpreter has no libdevice; numpy's cos/sin are accurate anyway
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c, s


@triton.jit
def _rotary_append_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, inv_freq_ptr, slots_ptr, kc_ptr, vc_ptr,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, so_b, so_h, so_d,
    spos_r, spos_b,
    skc_b, skc_h, skc_l, skc_d, svc_b, svc_h, svc_l, svc_d,
    seq_cap,
    HQ: tl.constexpr, HALF: tl.constexpr, ROT_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    SEC0: tl.constexpr, SEC01: tl.constexpr, MROPE: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, PRECISE_TRIG: tl.constexpr, EMU: tl.constexpr,
):
    # Grid (B, Hq + Hkv): programs h < Hq rotate a query head, the others rotate one key
    # head and copy its value head. One head per program gives B*(Hq+Hkv) small
    # programs (1024 for Qwen2.5-VL-7B at B=32), enough to spread over all SMs; the
    # cos/sin recomputation per head is ~Dh/2 transcendental ops, free next to latency.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    j, jm = lanes(0, BLOCK_HALF, HALF)

    c, s = _cos_sin(pos_ptr, inv_freq_ptr, b, spos_r, spos_b, j, jm, SEC0, SEC01, MROPE, PRECISE_TRIG)

    if h < HQ:
        src = q_ptr + b * sq_b + h * sq_h
        x1 = tl.load(src + j * sq_d, mask=jm, other=0.0).to(tl.float32)
        x2 = tl.load(src + (j + HALF) * sq_d, mask=jm, other=0.0).to(tl.float32)
        dst = out_ptr + b * so_b + h * so_h
        ety = out_ptr.dtype.element_ty
        tl.store(dst + j * so_d, cast_rne(x1 * c - x2 * s, ety, EMU), mask=jm)
        tl.store(dst + (j + HALF) * so_d, cast_rne(x2 * c + x1 * s, ety, EMU), mask=jm)
        if BLOCK_PASS > 0:
            t = ROT_DIM + tl.arange(0, BLOCK_PASS)
            tm = t < HEAD_DIM
            tl.store(dst + t * so_d, tl.load(src + t * sq_d, mask=tm), mask=tm)
    else:
        hk = h - HQ
        slot = tl.load(slots_ptr + b).to(tl.int64)
        # slot < 0: finished sample. Masking every store (instead of an early return)
        # keeps control flow uniform and costs nothing. A slot >= L_max (a full cache,
        # only diagnosed by the op's check=True, which syncs) writes nothing either
        # instead of corrupting the next sample's or head's rows.
        live = (slot >= 0) & (slot < seq_cap)
        wm = jm & live
        src = k_ptr + b * sk_b + hk * sk_h
        x1 = tl.load(src + j * sk_d, mask=jm, other=0.0).to(tl.float32)
        x2 = tl.load(src + (j + HALF) * sk_d, mask=jm, other=0.0).to(tl.float32)
        dst = kc_ptr + b * skc_b + hk * skc_h + slot * skc_l
        kty = kc_ptr.dtype.element_ty
        tl.store(dst + j * skc_d, cast_rne(x1 * c - x2 * s, kty, EMU), mask=wm)
        tl.store(dst + (j + HALF) * skc_d, cast_rne(x2 * c + x1 * s, kty, EMU), mask=wm)
        if BLOCK_PASS > 0:
            t = ROT_DIM + tl.arange(0, BLOCK_PASS)
            tm = (t < HEAD_DIM) & live
            tl.store(dst + t * skc_d, cast_rne(tl.load(src + t * sk_d, mask=tm), kty, EMU), mask=tm)
        # v is copied whole (no rotation): one vector of HEAD_DIM, split in the same
        # two halves plus the pass-through tail so no extra arange size is compiled.
        vsrc = v_ptr + b * sv_b + hk * sv_h
        vdst = vc_ptr + b * svc_b + hk * svc_h + slot * svc_l
        vty = vc_ptr.dtype.element_ty
        tl.store(vdst + j * svc_d, cast_rne(tl.load(vsrc + j * sv_d, mask=wm), vty, EMU), mask=wm)
        tl.store(vdst + (j + HALF) * svc_d, cast_rne(tl.load(vsrc + (j + HALF) * sv_d, mask=wm), vty, EMU), mask=wm)
        if BLOCK_PASS > 0:
            t = ROT_DIM + tl.arange(0, BLOCK_PASS)
            tm = (t < HEAD_DIM) & live
            tl.store(vdst + t * svc_d, cast_rne(tl.load(vsrc + t * sv_d, mask=tm), vty, EMU), mask=tm)


def rotary_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, positions: torch.Tensor,
                  inv_freq: torch.Tensor, mrope_section=None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, rotary_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; arguments were validated by medlvr.ops.decode.rotary_append."""
    B, Hq, Dh = q.shape
    Hkv = k.shape[1]
    half = rotary_dim // 2
    if out is None:
        out = torch.empty_like(q)
    if mrope_section is None:
        sec0 = sec01 = half
        spos_r, spos_b = 0, positions.stride(0)
    else:
        s = list(mrope_section)
        sec0, sec01 = s[0], s[0] + s[1]
        spos_r, spos_b = positions.stride(0), positions.stride(1)
    # The kernel indexes these vectors densely; both calls are no-ops for the usual
    # contiguous fp32 / integer buffers (and capturable copies otherwise).
    inv_freq = inv_freq.to(torch.float32).contiguous()
    slots = slots.contiguous()
    n_pass = Dh - rotary_dim
    with on_device(q):
        _rotary_append_kernel[(B, Hq + Hkv)](
            q, k, v, out, positions, inv_freq, slots, k_cache, v_cache,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            spos_r, spos_b,
            *k_cache.stride(), *v_cache.stride(),
            k_cache.shape[2],
            HQ=Hq, HALF=half, ROT_DIM=rotary_dim, HEAD_DIM=Dh,
            SEC0=sec0, SEC01=sec01, MROPE=mrope_section is not None,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=triton.next_power_of_2(n_pass) if n_pass > 0 else 0,
            PRECISE_TRIG=q.device.type == "cuda", EMU=q.device.type != "cuda",
            # Dh/2 = 64 lanes per half: one warp covers a head; more warps would idle.
            num_warps=1 if half <= 64 else 2,
        )
    return out
