"""Per-step ops of the latent decode engine: fused rotary + KV append, split-K GQA decode
attention, the final-norm hidden-state feedback, and the layers' residual add + RMSNorm.

Inference only (no autograd). Every op is CUDA-graph capturable on the Triton path:
arguments are validated from shapes/dtypes/devices only (no host sync), grids depend on
shapes only, and outputs can be preallocated. Value checks (slot and length ranges)
need the data on the host, so they run only for CPU tensors or with ``check=True``.

Dispatch: ``medlvr.ops._checks.backend`` -> Triton on CUDA, the reference on CPU (Triton
on CPU only when forced, under TRITON_INTERPRET=1). fp64 rule (medlvr/ops/_checks.py):
the kernels compute in fp32, so a call with any fp64 tensor takes the reference, which
computes it in fp64; forcing Triton on one is a TypeError naming the argument.
No op here has a loss or a gradient (inference only).

Shapes (B samples this step, B_max/L_max cache capacity, GQA Hq = group * Hkv):
    rotary_append(q (B Hq Dh), k/v (B Hkv Dh), positions (B)|(3 B), inv_freq (rd/2),
                  k_cache/v_cache (B_max Hkv L_max Dh), slots (B)) -> q_rot (B Hq Dh)
    decode_attention(q (B Hq Dh), k_cache/v_cache (B_max Hkv L_max Dh), lengths (B),
                  rows (B)?, return_lse?) -> out (B Hq Dh) [, lse (B Hq) fp32]
    merge_attention(o_a, lse_a, o_b, lse_b) -> out (B Hq Dh)  (cascade attention)
    rmsnorm_feedback(hidden (B D), weight (D), out (B D), active (B)?) -> normed (B D)
    add_rmsnorm(x (B D), residual (B D), weight (D)) -> normed (B D), new_residual (B D)
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Sequence

import torch

from medlvr.capture import in_guarded_region
from medlvr.ops import _checks
from medlvr.reference import decode as ref

__all__ = ["rotary_append", "decode_attention", "merge_attention", "rmsnorm_feedback", "write_feedback", "add_rmsnorm"]

_FLOATS = _checks.FLOAT_DTYPES
_INTS = (torch.int32, torch.int64)


def _kernels(name: str):
    """``medlvr.kernels.<name>``, imported on first use so that importing medlvr.ops does
    not import triton."""
    return importlib.import_module(f"medlvr.kernels.{name}")


# ---------------------------------------------------------------- argument checks
def _check_caches(k_cache, v_cache, *, B: int, Hkv: int, Dh: int) -> None:
    _checks.tensor("k_cache", k_cache, dims=4, dtypes=_FLOATS)
    _checks.tensor("v_cache", v_cache, dims=4, dtypes=_FLOATS)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_cache.shape[0] < B:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} samples (dim 0), fewer than the batch B={B}")
    if k_cache.shape[1] != Hkv or k_cache.shape[3] != Dh:
        raise ValueError(f"k_cache must have shape (B_max, Hkv={Hkv}, L_max, Dh={Dh}), got {tuple(k_cache.shape)}")
    if k_cache.shape[2] < 1:
        raise ValueError(f"k_cache must hold at least one position (L_max >= 1), got {tuple(k_cache.shape)}")


def _debug_checks_on(check: bool, t: torch.Tensor) -> bool:
    # Reading values syncs a GPU, which would break CUDA-graph capture and stall the
    # step: only on CPU or on request, and never in a region checked as a graph would be
    # (medlvr/capture.py), where CPU stands in for a GPU.
    return check or (t.device.type == "cpu" and not in_guarded_region())


# ---------------------------------------------------------------- rotary + append
def rotary_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, positions: torch.Tensor,
                  inv_freq: torch.Tensor, mrope_section: Sequence[int] | None = None,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  rotary_dim: int | None = None, out: torch.Tensor | None = None,
                  check: bool = False) -> torch.Tensor:
    """Rotary embedding of this step's q and k (HF rotate_half convention; mRoPE when
    ``mrope_section`` is given) and append of rope(k), v into the static KV cache.

    Dtypes: q, k, v one dtype (fp16/bf16/fp32/fp64), and ``out`` too. Mixed is accepted
    for the caches (any float dtype: rope(k) and v are cast to it on write) and inv_freq
    (cast to the compute dtype). Math in fp32 (fp64 for fp64 q), one rounding to each
    output's dtype at the end. Any fp64 tensor takes the reference (fp64 rule).
    q (B Hq Dh), k/v (B Hkv Dh).
    positions int (B) for plain RoPE, (3, B) = (temporal, height, width) for mRoPE.
    inv_freq (rotary_dim/2); rotary_dim (default Dh) rotates only the leading dims.
    mrope_section: 3 chunk sizes of the half rotary dim, summing to rotary_dim/2, e.g.
        (16, 24, 24) for Qwen2.5-VL; chunk i uses position row i.
    k_cache/v_cache (B_max Hkv L_max Dh), B_max >= B; slots int (B): the position in the
        cache to write for sample b; slots[b] < 0 writes nothing (finished sample).
    Returns rope(q) (B Hq Dh), a new tensor or ``out``.
    check: validate slot values (< L_max) on a GPU too (syncs: not inside a graph).
        Without it a GPU call with a slot >= L_max writes nothing for that sample (the
        kernel never writes outside the cache); CPU calls are always checked.
    """
    _checks.tensor("q", q, dims=3, dtypes=_FLOATS)
    _checks.tensor("k", k, dims=3, dtypes=_FLOATS)
    _checks.tensor("v", v, dims=3, dtypes=_FLOATS)
    B, Hq, Dh = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}")
    if k.shape[0] != B or k.shape[2] != Dh:
        raise ValueError(f"k must have shape (B={B}, Hkv, Dh={Dh}), got {tuple(k.shape)}")
    _checks.shape("v", v, tuple(k.shape))
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if Dh % 2 != 0:
        raise ValueError(f"head dim Dh must be even for rotary, got {Dh}")
    rd = Dh if rotary_dim is None else rotary_dim
    if not isinstance(rd, int) or rd < 2 or rd > Dh or rd % 2 != 0:
        raise ValueError(f"rotary_dim must be an even int in [2, Dh={Dh}], got {rotary_dim!r}")
    _checks.tensor("inv_freq", inv_freq, dims=1, dtypes=_FLOATS)
    _checks.shape("inv_freq", inv_freq, (rd // 2,))
    _checks.tensor("positions", positions, dtypes=_INTS)
    if mrope_section is None:
        _checks.shape("positions", positions, (B,))
    else:
        sec = list(mrope_section)
        # Three chunks (temporal, height, width) as in every Qwen2/2.5-VL config; the
        # kernel bakes the two chunk boundaries in as constants.
        if len(sec) != 3 or not all(isinstance(s, int) and s > 0 for s in sec):
            raise ValueError(f"mrope_section must be 3 positive ints (t, h, w), got {mrope_section!r}")
        if sum(sec) != rd // 2:
            raise ValueError(f"mrope_section must sum to rotary_dim/2 = {rd // 2}, got {tuple(sec)} (sum {sum(sec)})")
        _checks.shape("positions", positions, (3, B))
    _check_caches(k_cache, v_cache, B=B, Hkv=Hkv, Dh=Dh)
    _checks.tensor("slots", slots, dims=1, dtypes=_INTS)
    _checks.shape("slots", slots, (B,))
    if out is not None:
        _checks.tensor("out", out, dtypes=(q.dtype,))
        _checks.shape("out", out, tuple(q.shape))
    _checks.same_devices("q", q, k=k, v=v, positions=positions, inv_freq=inv_freq, k_cache=k_cache, v_cache=v_cache,
                 slots=slots, out=out)
    if _debug_checks_on(check, q) and B > 0:
        hi = int(slots.max())
        if hi >= k_cache.shape[2]:
            raise ValueError(f"slots must be < L_max = {k_cache.shape[2]} (cache full), got max slot {hi}")

    backend = _checks.backend("rotary_append", q.device, has_triton=True, q=q, k=k, v=v, inv_freq=inv_freq,
                              k_cache=k_cache, v_cache=v_cache, out=out)
    kw = dict(positions=positions, inv_freq=inv_freq, mrope_section=mrope_section, k_cache=k_cache,
              v_cache=v_cache, slots=slots, rotary_dim=rd, out=out)
    if backend == "triton" and B > 0:
        return _kernels("rotary_append").rotary_append(q, k, v, **kw)
    return ref.rotary_append(q, k, v, **kw)


# ---------------------------------------------------------------- decode attention
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     scale: float | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, check: bool = False, rows: torch.Tensor | None = None,
                     return_lse: bool = False):
    """Single-token GQA attention over per-sample cache lengths (flash-decoding split-K).

    Dtypes: q, k_cache, v_cache and ``out`` one dtype (fp16/bf16/fp32/fp64; nothing mixed:
    the kernel's tensor-core dots take one input dtype). Scores, softmax and accumulators
    in fp32 (fp64 for fp64, on the reference); the output is rounded once to q's dtype.
    q (B Hq Dh); k_cache/v_cache (B_max Hkv L_max Dh), only rows b < B read; query head
    h reads kv head h // (Hq // Hkv). lengths int (B): valid positions of sample b (the
    step's own key included); 0 gives a zero output. scale defaults to Dh ** -0.5.
    num_splits: how many chunks of L_max run in parallel (default: from L_max and the
    SM count; never from the lengths, so a captured graph stays valid as they grow).
    Returns out (B Hq Dh) in q's dtype.
    rows: int (B), the cache row query row b reads (default b): cascade attention's
        shared prefix, G query rows over one prompt's K/V (the cache then needs only as
        many rows as distinct prompts, B_max >= max(rows) + 1).
    return_lse: return (out, lse), lse (B Hq) fp32 (fp64 for fp64) the log-sum-exp of the
        scaled scores in natural log, -inf for length 0: merge_attention combines two
        calls over disjoint keys into attention over both.
    check: validate 0 <= lengths <= L_max (and 0 <= rows < B_max) on a GPU too (syncs:
        not inside a graph). Without it the kernel reads at most L_max positions of each
        sample and clamps rows into the cache; CPU calls are always checked.
    """
    _checks.tensor("q", q, dims=3, dtypes=_FLOATS)
    B, Hq, Dh = q.shape
    _checks.tensor("k_cache", k_cache, dims=4, dtypes=_FLOATS)
    Hkv = k_cache.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of the cache's kv heads ({Hkv})")
    _check_caches(k_cache, v_cache, B=B if rows is None else min(B, 1), Hkv=Hkv, Dh=Dh)
    if rows is not None:
        _checks.tensor("rows", rows, dims=1, dtypes=_INTS)
        _checks.shape("rows", rows, (B,))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    if k_cache.dtype != q.dtype:  # the kernel's tensor-core dots take one input dtype
        raise TypeError(f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
    _checks.tensor("lengths", lengths, dims=1, dtypes=_INTS)
    _checks.shape("lengths", lengths, (B,))
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if out is not None:
        _checks.tensor("out", out, dtypes=(q.dtype,))
        _checks.shape("out", out, tuple(q.shape))
    _checks.same_devices("q", q, k_cache=k_cache, v_cache=v_cache, lengths=lengths, out=out, rows=rows)
    if _debug_checks_on(check, q) and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > k_cache.shape[2]:
            raise ValueError(f"lengths must lie in [0, L_max = {k_cache.shape[2]}], got range [{lo}, {hi}]")
        if rows is not None:
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"rows must lie in [0, B_max = {k_cache.shape[0]}), got range [{lo}, {hi}]")

    backend = _checks.backend("decode_attention", q.device, has_triton=True, q=q, k_cache=k_cache,
                              v_cache=v_cache, out=out)
    if backend == "triton" and B > 0:
        lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device) if return_lse else None
        o = _kernels("decode_attention").decode_attention(q, k_cache, v_cache, lengths, scale=scale,
                                                          num_splits=num_splits, out=out, rows=rows, lse=lse)
        return (o, lse) if return_lse else o
    return ref.decode_attention(q, k_cache, v_cache, lengths, scale=scale, out=out, rows=rows,
                                return_lse=return_lse)


# ---------------------------------------------------------------- cascade merge
def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over two disjoint key sets from each set's output and log-sum-exp (the
    cascade merge, FlashInfer's merge_state): prefix call + suffix call + this = one
    attention over prefix and suffix (medlvr/reference/decode.py has the math).

    o_a, o_b (B H Dh) one float dtype; lse_a, lse_b (B H) float, natural log, -inf for an
    empty set (as decode_attention(..., return_lse=True) returns them). Math in fp32
    (fp64 for fp64); returns out (B H Dh) in o_a's dtype. A few elementwise torch ops on
    every device: no host sync, capturable in a CUDA graph.
    """
    _checks.tensor("o_a", o_a, dims=3, dtypes=_FLOATS)
    _checks.tensor("o_b", o_b, dims=3, dtypes=(o_a.dtype,))
    _checks.shape("o_b", o_b, tuple(o_a.shape))
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _checks.tensor(name, t, dims=2, dtypes=_FLOATS)
        _checks.shape(name, t, tuple(o_a.shape[:2]))
    if out is not None:
        _checks.tensor("out", out, dtypes=(o_a.dtype,))
        _checks.shape("out", out, tuple(o_a.shape))
    _checks.same_devices("o_a", o_a, o_b=o_b, lse_a=lse_a, lse_b=lse_b, out=out)
    return ref.merge_attention(o_a, lse_a, o_b, lse_b, out=out)


# ---------------------------------------------------------------- norm + feedback
def rmsnorm_feedback(hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, out: torch.Tensor,
                     active: torch.Tensor | None = None,
                     projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Final RMSNorm of the last hidden state, written straight into the next latent
    step's input-embedding buffer.

    hidden (B D), weight (D): normed = weight * (hidden_fp32 * rsqrt(mean(hidden_fp32^2)
    + eps)).to(hidden.dtype), HF Qwen2RMSNorm's convention (dtype promote(weight, hidden)).
    out (B D): receives normed (or projector(normed)) in rows where ``active`` (bool (B))
    is True, every row when active is None; other rows are left untouched.
    Dtypes: hidden and weight may differ (e.g. bf16 hidden, fp32 weight): the statistic
    is fp32 (fp64 for fp64 hidden), the normed value is rounded to hidden's dtype and
    then multiplied by the weight in promote(hidden, weight), HF's order; ``out`` may be
    any float dtype, the result is cast into it. Any fp64 tensor takes the reference.
    Returns: without projector ``out`` itself; with a projector the normed hidden (B D).
    The projector (any callable, e.g. nn.Linear) runs in torch after the fused norm.
    """
    _checks.tensor("hidden", hidden, dims=2, dtypes=_FLOATS)
    B, D = hidden.shape
    _checks.tensor("weight", weight, dims=1, dtypes=_FLOATS)
    _checks.shape("weight", weight, (D,))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _checks.tensor("out", out, dims=2, dtypes=_FLOATS)
    if out.shape[0] != B or (projector is None and out.shape[1] != D):
        want = f"(B={B}, D={D})" if projector is None else f"(B={B}, projector's output size)"
        raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
    if active is not None:
        _checks.tensor("active", active, dims=1, dtypes=(torch.bool,))
        _checks.shape("active", active, (B,))
    if projector is not None and not callable(projector):
        raise TypeError(f"projector must be callable or None, got {type(projector).__name__}")
    _checks.same_devices("hidden", hidden, weight=weight, out=out, active=active)

    backend = _checks.backend("rmsnorm_feedback", hidden.device, has_triton=True, hidden=hidden, weight=weight,
                              out=out)
    if backend == "triton" and B > 0:
        mod = _kernels("rmsnorm_feedback")
        if projector is None:
            mod.rmsnorm_feedback(hidden, weight, eps=float(eps), out=out, active=active)
            return out
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        normed = torch.empty((B, D), dtype=dt, device=hidden.device)
        mod.rmsnorm_feedback(hidden, weight, eps=float(eps), out=normed, active=None)
        return ref.write_feedback(normed, out=out, active=active, projector=projector)
    return ref.rmsnorm_feedback(hidden, weight, eps=float(eps), out=out, active=active, projector=projector)


def write_feedback(normed: torch.Tensor, *, out: torch.Tensor, active: torch.Tensor | None = None,
                   projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The feedback half of :func:`rmsnorm_feedback` for a hidden state already normed by any
    final norm (GPT-2's LayerNorm too): out[b] = projector(normed[b]) (or normed[b]) where
    ``active``, the same return value (``out`` without projector, else ``normed``). One select,
    no host sync, so it runs inside a captured step; plain torch on every device (the
    reference's, medlvr/reference/decode.py), after these checks."""
    _checks.tensor("normed", normed, dims=2, dtypes=_FLOATS)
    _checks.tensor("out", out, dims=2, dtypes=_FLOATS)
    if out.shape[0] != normed.shape[0]:
        raise ValueError(f"out must have {normed.shape[0]} rows (normed's), got {tuple(out.shape)}")
    if active is not None:
        _checks.tensor("active", active, dims=1, dtypes=(torch.bool,))
        _checks.shape("active", active, (normed.shape[0],))
    if projector is not None and not callable(projector):
        raise TypeError(f"projector must be callable or None, got {type(projector).__name__}")
    return ref.write_feedback(normed, out=out, active=active, projector=projector)


# ---------------------------------------------------------------- residual add + norm
def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, *,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm decoder layer's residual add and the RMSNorm that follows, in one pass:

        new_residual = residual + x
        normed       = weight * (new_residual_fp32 * rsqrt(mean(new_residual_fp32^2) + eps))
                                .to(new_residual.dtype)

    x (B D) (the o_proj or MLP output), residual (B D), weight (D); strided rows are fine.
    Returns (normed (B D), new_residual (B D)), both new tensors.
    Dtypes: x and residual may differ (under bf16 autocast a bf16 projection output is
    added to an fp32 residual): new_residual has torch's promote(residual, x), the sum
    computed in fp32 and rounded once, bit-equal to ``residual + x``. normed follows
    rmsnorm_feedback's convention on new_residual: fp32 statistic (fp64 for fp64), rounded
    to new_residual's dtype, times the weight in promote(new_residual, weight). Any fp64
    tensor takes the reference (fp64 rule, medlvr/ops/_checks.py). No out buffers: inside
    a captured graph the allocations come from the graph's pool.
    """
    _checks.tensor("x", x, dims=2, dtypes=_FLOATS)
    B, D = x.shape
    _checks.tensor("residual", residual, dims=2, dtypes=_FLOATS)
    _checks.shape("residual", residual, (B, D))
    _checks.tensor("weight", weight, dims=1, dtypes=_FLOATS)
    _checks.shape("weight", weight, (D,))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _checks.same_devices("x", x, residual=residual, weight=weight)

    backend = _checks.backend("add_rmsnorm", x.device, has_triton=True, x=x, residual=residual, weight=weight)
    if backend == "triton" and B > 0:
        return _kernels("rmsnorm_feedback").add_rmsnorm(x, residual, weight, eps=float(eps))
    return ref.add_rmsnorm(x, residual, weight, eps=float(eps))
