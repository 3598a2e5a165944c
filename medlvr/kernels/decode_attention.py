"""Split-K ("flash-decoding") GQA attention for one query token per sample over a static
KV cache with per-sample lengths. Raw kernels and launcher only: checks and dispatch are
in medlvr.ops.decode.

Decode attention is memory-bound: every step reads the whole valid K and V of every
sample once (Qwen2.5-VL-7B, B=1, L=4096: 4 kv heads * 4096 * 128 * 2 B * 2 = 8 MB per
layer) and does ~1 FLOP per byte. Two consequences shape the kernel:

* K/V must be read once per kv head, not once per query head: a program owns
  (sample b, kv head, split s) and computes all `group` query heads of that kv head
  together (a [GROUP, Dh] x [Dh, BLOCK_N] tl.dot; GROUP is padded to 16 rows for the
  tensor-core tile, the padding rows cost registers, not bandwidth).
* One (b, kv head) is far too little parallelism for 132 SMs at small batch, so the
  sequence is cut into `num_splits` chunks processed by separate programs (stage 1),
  each leaving its partial output (normalised by its own softmax sum) and
  log-sum-exp; stage 2 merges the splits per (b, query head). num_splits depends on
  shapes only (L_max, B, Hkv, SM count), never on the lengths, so a CUDA graph
  captured once stays valid while the lengths grow; splits past a sample's length
  simply do no work.

Softmax in base 2: scores are scaled by scale * log2(e) so exp2 (one MUFU op) replaces
exp. All statistics and accumulators are fp32.

Cascade attention (grouped rollouts, medlvr/engine/group.py): with a row map, query row b
reads cache row ``rows[b]`` (G query rows share one prompt's K/V, read in place, never
copied), and with an lse output each row's log-sum-exp (natural log) is written next to
its output so that a prefix call and a suffix call can be merged exactly
(medlvr.ops.decode.merge_attention). Both are constexpr switches: the plain kernel is
unchanged.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from medlvr.kernels._common import cast_rne, lanes
from medlvr.kernels._device import on_device


_LOG2E = 1.4426950408889634
# 64 keys per tile: a K (or V) tile of 64 x 128 bf16 is 16 KB, so double-buffering both
# fits comfortably in shared memory while the loop still issues large coalesced loads.
# Splits are cut in whole BLOCK_N tiles (default_num_splits).
BLOCK_N = 64
# fp32 caches take the exact path: IEEE fp32 dots run on FMA units, not tensor cores, and
# Triton's FMA dot holds both operands and the product of a tile in registers. With
# BLOCK_N keys and 4 warps that overflows them: 255 registers and ~190 B of spill per
# thread at Dh = 128 on sm_80, and kilobytes on both targets for the 32- and 64-row query
# blocks of grouped rollouts (medlvr/engine/group.py). Half the keys per tile over twice
# the threads fits every block (16-64 rows x Dh 128) in 64-154 registers without a spill
# (tests/ops/test_decode_compile.py compiles them for sm_90 and sm_80); FP32_BLOCK_N
# divides BLOCK_N, so the splits are unchanged.
FP32_BLOCK_N, FP32_WARPS = 32, 8


@triton.jit
def _attend(q, k_base, v_base, lo, hi, d, dm, sk_l, sk_d, sv_l, sv_d, qk_scale,
            BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
            UPCAST_DOT: tl.constexpr):
    """Online softmax of the query rows q over keys [lo, hi) of one cache row: (acc, m_i,
    l_i), the unnormalised output, the running max (log2 units) and the softmax sum."""
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # The loop only visits [lo, hi): every visited tile holds at least one valid key,
    # so m_i is finite after the first tile and exp2(m_i - m_new) never sees -inf - -inf.
    for start in range(lo, hi, BLOCK_N):
        n, nm = lanes(start, BLOCK_N, hi)
        kv_mask = nm[:, None] & dm[None, :]
        k = tl.load(k_base + n[:, None] * sk_l + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        # DOT_PREC is "ieee" for fp32 caches: they must not silently drop to tf32 (the
        # fp32 path is the exact one); it has no effect on bf16/fp16 tensor-core dots.
        if UPCAST_DOT:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        # p in the value dtype for the tensor-core dot (flash-attention practice; p <= 1).
        pv = cast_rne(p, v.dtype, UPCAST_DOT)
        if UPCAST_DOT:  # same rounding of p as on the GPU, then an exact fp32 product
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_attn_stage1(
    q_ptr, kc_ptr, vc_ptr, len_ptr, o_ptr, lse_ptr, part_ptr, map_ptr, lo_ptr,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    so_b, so_h, so_d,
    sp_b, sp_h, sp_s, sp_d, sl_b, sl_h, sl_s, slo_b, slo_h,
    qk_scale, split_len, seq_cap, row_cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, EMU: tl.constexpr,
    HAS_MAP: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)

    g, gm = lanes(0, BLOCK_G, GROUP)
    d, dm = lanes(0, BLOCK_D, HEAD_DIM)
    h = hk * GROUP + g  # query heads sharing kv head hk (HF repeat_kv: h // GROUP == hk)

    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :] * sq_d,
                mask=gm[:, None] & dm[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    length = tl.load(len_ptr + b).to(tl.int64)
    lo = s * split_len
    # seq_cap = L_max: a length beyond the cache (only diagnosed by check=True) must
    # not turn into reads past the sample's rows.
    hi = tl.minimum(tl.minimum(lo + split_len, length), seq_cap)

    if HAS_MAP:
        # The cache row this query row reads; clamped to the cache (row_cap = B_max) so an
        # unchecked bad map never reads outside it (checked on CPU / with check=True).
        row = tl.minimum(tl.maximum(tl.load(map_ptr + b).to(tl.int64), 0), row_cap - 1)
    else:
        row = b
    k_base = kc_ptr + row * sk_b + hk * sk_h
    v_base = vc_ptr + row * sv_b + hk * sv_h
    acc, m_i, l_i = _attend(q, k_base, v_base, lo, hi, d, dm, sk_l, sk_d, sv_l, sv_d, qk_scale,
                            BLOCK_G, BLOCK_D, BLOCK_N, DOT_PREC, UPCAST_DOT)

    # An empty split (or a length-0 sample) leaves l_i = 0: write 0 and lse = -inf so the
    # merge gives it weight 0; never 0/0.
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if SINGLE:
        # One split covers the sequence: this is already the answer, skip stage 2.
        tl.store(o_ptr + b * so_b + h[:, None] * so_h + d[None, :] * so_d,
                 cast_rne(o, o_ptr.dtype.element_ty, EMU), mask=gm[:, None] & dm[None, :])
        if WRITE_LSE:  # natural log: log2 units * ln 2
            lse1 = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                            float("-inf"))
            tl.store(lo_ptr + b * slo_b + h * slo_h, lse1, mask=gm)
    else:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_ptr + b * sp_b + h[:, None] * sp_h + s * sp_s + d[None, :] * sp_d, o,
                 mask=gm[:, None] & dm[None, :])
        tl.store(lse_ptr + b * sl_b + h * sl_h + s * sl_s, lse, mask=gm)


@triton.jit
def _decode_attn_stage2(
    o_ptr, lse_ptr, part_ptr, lo_ptr,
    so_b, so_h, so_d, sp_b, sp_h, sp_s, sp_d, sl_b, sl_h, sl_s, slo_b, slo_h,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    EMU: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    # out = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M), M = max_s lse_s: the
    # standard logsumexp merge of normalised partial outputs.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp, sm = lanes(0, BLOCK_S, SPLITS)
    d, dm = lanes(0, BLOCK_D, HEAD_DIM)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + sp * sl_s, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # length 0: all weights 0, output 0
    w = tl.exp2(lse - mx)
    den = tl.sum(w, axis=0)
    part = tl.load(part_ptr + b * sp_b + h * sp_h + sp[:, None] * sp_s + d[None, :] * sp_d,
                   mask=sm[:, None] & dm[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(o_ptr + b * so_b + h * so_h + d * so_d, cast_rne(o, o_ptr.dtype.element_ty, EMU), mask=dm)
    if WRITE_LSE:  # log-sum-exp over all splits, natural log
        tot = tl.where(den > 0.0, (mx + tl.log2(tl.where(den > 0.0, den, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lo_ptr + b * slo_b + h * slo_h, tot)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (sizes the split-K grid)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(B: int, Hkv: int, L_max: int, device: torch.device) -> int:
    """Splits so that B * Hkv * splits fills the GPU about twice over (two waves hide the
    tail of programs whose split ends early), with at least BLOCK_N keys per split.
    A function of shapes and the device only, never of lengths (graph-safe)."""
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = math.ceil(2 * sms / max(B * Hkv, 1))
    return max(1, min(want, triton.cdiv(L_max, BLOCK_N)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     scale: float | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; arguments were validated by medlvr.ops.decode.decode_attention.
    rows (B) int: cache row of query row b (default b); lse (B Hq) fp32: receives each
    row's log-sum-exp of the scaled scores (natural log, -inf for length 0)."""
    B, Hq, Dh = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    lengths = lengths.contiguous()  # indexed densely by the kernel; a no-op normally
    if num_splits is None:
        splits = default_num_splits(B, Hkv, L, q.device)
        # Whole tiles per split, then drop splits that would start past L_max.
        split_len = triton.cdiv(triton.cdiv(L, splits), BLOCK_N) * BLOCK_N
        splits = triton.cdiv(L, split_len)
    else:  # honoured exactly (trailing splits may be empty)
        splits = num_splits
        split_len = triton.cdiv(L, splits)
    qk_scale = (Dh ** -0.5 if scale is None else float(scale)) * _LOG2E
    # tl.dot needs >= 16 rows/cols on GPUs; padded rows are masked on load and store.
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(Dh))
    single = splits == 1
    interpreted = q.device.type != "cuda"
    lse_out = lse
    if single:
        part = part_lse = out  # unused by the SINGLE specialisation; any tensor will do
        sp, sl = (0, 0, 0, 0), (0, 0, 0)
    else:
        # Scratch in fp32, shaped by (B, Hq, splits, Dh): values never matter for its
        # size, so it is allocated from the graph pool during capture like any output.
        part = torch.empty((B, Hq, splits, Dh), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        sp, sl = part.stride(), part_lse.stride()
    slo = lse_out.stride() if lse_out is not None else (0, 0)
    rows_arg = rows.contiguous() if rows is not None else lengths  # unused without HAS_MAP
    fp32 = k_cache.dtype == torch.float32
    with on_device(q):
        _decode_attn_stage1[(B, Hkv, splits)](
            q, k_cache, v_cache, lengths, out, part_lse, part, rows_arg,
            lse_out if lse_out is not None else part_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            *sp, *sl, *slo,
            qk_scale, split_len, L, k_cache.shape[0],
            GROUP=group, HEAD_DIM=Dh, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=FP32_BLOCK_N if fp32 else BLOCK_N,
            SINGLE=single, DOT_PREC="ieee" if fp32 or interpreted else "tf32",
            # triton 3.8's interpreter multiplies bf16 dot operands as their uint16 bit
            # patterns (create_dot has no bf16 case), so on CPU the operands go to fp32 first.
            UPCAST_DOT=interpreted, EMU=interpreted, HAS_MAP=rows is not None, WRITE_LSE=lse_out is not None,
            # sm_90, bf16, Dh=128 (tests/ops/test_decode_compile.py): 78 registers, no
            # spills, K/V tiles double-buffered through cp.async in 38 KB of shared memory,
            # so ~5 programs fit per SM. Deeper pipelining (3 stages, 72 KB) would halve
            # the resident programs, and at small batch a split holds only 1-2 tiles anyway.
            num_warps=FP32_WARPS if fp32 else 4, num_stages=2,
        )
        if not single:
            _decode_attn_stage2[(B, Hq)](
                out, part_lse, part, lse_out if lse_out is not None else part_lse,
                *out.stride(), *sp, *sl, *slo,
                SPLITS=splits, HEAD_DIM=Dh, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, EMU=interpreted,
                WRITE_LSE=lse_out is not None,
                # The [splits, Dh] fp32 partial tile is loaded whole: 4 warps keep it at
                # <= 64 values per thread for 64 splits x 128 (54 registers at sm_90).
                num_warps=4 if triton.next_power_of_2(splits) * block_d >= 4096 else 2,
            )
    return out
