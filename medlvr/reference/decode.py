"""Plain-PyTorch references of the three per-step ops of the latent decode engine.

These are the executable specification the Triton kernels in ``medlvr.kernels`` are
tested against, and the fallback on CPU. They are written to stay usable inside the
engine too: no host syncs, no data-dependent shapes, so a CUDA graph can capture them.

Shape notation: B samples this step, B_max the cache's batch capacity, Hq / Hkv query /
key-value heads (GQA: Hq = group * Hkv), L_max cache capacity per sample, Dh head dim,
D hidden size.

    rotary_append(q (B Hq Dh), k (B Hkv Dh), v (B Hkv Dh), positions (B) | (3 B), ...)
        -> q_rot (B Hq Dh); writes rope(k) and v into caches (B_max Hkv L_max Dh) at slots
    decode_attention(q (B Hq Dh), k_cache, v_cache (B_max Hkv L_max Dh), lengths (B))
        -> out (B Hq Dh)  [, lse (B Hq)]
    merge_attention(o_a, lse_a, o_b, lse_b) -> out (B Hq Dh): attention over both key sets
    rmsnorm_feedback(hidden (B D), weight (D), out (B D)) -> normed (B D)
    add_rmsnorm(x (B D), residual (B D), weight (D)) -> normed (B D), new_residual (B D)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 math for every half type; fp64 stays fp64 so the engine's fp64 oracle tests
    # (tests/engine, in fp64) can run the reference end to end.
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int] | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, rotary_dim) in the rotate_half layout, the way transformers
    5.24 builds them (Qwen2_5_VLRotaryEmbedding.forward + recomposition_frequencies).

    Plain RoPE: angle[b, j] = positions[b] * inv_freq[j], duplicated over both halves.
    mRoPE: positions is (3, B) = (temporal, height, width). The half-dim is cut into
    consecutive chunks of sizes ``mrope_section`` (e.g. 16, 24, 24); chunk i takes its
    angle from position row i % 3. The recomposed half is then duplicated over both
    halves (torch.cat((freq, freq))), i.e. dims j and j + Dh/2 share one angle.
    """
    inv = inv_freq.to(dtype)
    if mrope_section is None:
        freqs = positions.to(dtype)[:, None] * inv  # (B, half)
    else:
        freqs3 = positions.to(dtype)[:, :, None] * inv  # (3, B, half)
        chunks = freqs3.split(list(mrope_section), dim=-1)
        freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    # Same expression and order of operations as HF's apply_rotary_pos_emb, so fp32
    # results are bit-identical to transformers on the same device.
    xr = x[..., :rotary_dim]
    rot = xr * cos[:, None, :] + _rotate_half(xr) * sin[:, None, :]
    if rotary_dim == x.shape[-1]:
        return rot
    return torch.cat((rot, x[..., rotary_dim:]), dim=-1)


def rotary_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, positions: torch.Tensor,
                  inv_freq: torch.Tensor, mrope_section: Sequence[int] | None = None,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  rotary_dim: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k by their sample's position, append rope(k) and v to the caches.

    Writes k_cache[b, :, slots[b]] = rope(k[b]) and v_cache[b, :, slots[b]] = v[b] for
    every b with slots[b] >= 0; a negative slot (finished sample) writes nothing.
    Returns rope(q) (into ``out`` when given). Math in fp32 (fp64 for fp64 inputs), one
    rounding to the storage dtype at the end.
    """
    B, _, Dh = q.shape
    rd = Dh if rotary_dim is None else rotary_dim
    cdt = _compute_dtype(q.dtype)
    cos, sin = rope_cos_sin(positions, inv_freq, mrope_section, cdt)
    q_rot = _apply_rope(q.to(cdt), cos, sin, rd).to(q.dtype)
    k_rot = _apply_rope(k.to(cdt), cos, sin, rd)

    # Inactive samples rewrite the value already in the cache at slot 0 (a gather, a
    # where and a scatter) instead of being skipped: no data-dependent shapes, so this
    # stays capturable by a CUDA graph.
    rows = torch.arange(B, device=q.device)
    active = slots >= 0
    idx = slots.clamp(min=0).long()
    keep = active[:, None, None]
    k_cache[rows, :, idx] = torch.where(keep, k_rot.to(k_cache.dtype), k_cache[rows, :, idx])
    v_cache[rows, :, idx] = torch.where(keep, v.to(v_cache.dtype), v_cache[rows, :, idx])
    if out is not None:
        out.copy_(q_rot)
        return out
    return q_rot


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     scale: float | None = None, out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     return_lse: bool = False):
    """One query token per sample against its first lengths[b] cache positions.

    GQA: query head h reads kv head h // group (HF repeat_kv). Softmax in fp32 with a
    length mask; a sample with length 0 gets an all-zero output, never NaN.
    rows (B): query row b reads cache row rows[b] (default b): G rows sharing one prompt.
    return_lse: also return lse (B Hq), log sum_j exp(scale * q.k_j) in natural log (fp32,
    fp64 for fp64; -inf for length 0), what merge_attention needs.
    """
    B, Hq, Dh = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    sc = Dh ** -0.5 if scale is None else scale
    # Query heads grouped under their kv head (h = hk * group + g, HF repeat_kv), so K/V
    # are used as stored instead of being repeated `group` times.
    qg = q.to(cdt).reshape(B, Hkv, group, Dh)
    if rows is None:
        k, v = k_cache[:B].to(cdt), v_cache[:B].to(cdt)  # (B, Hkv, L, Dh)
    else:  # a gather of each row's cache row (index_select: no data-dependent shape)
        idx = rows.to(q.device).long()
        k, v = k_cache.index_select(0, idx).to(cdt), v_cache.index_select(0, idx).to(cdt)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * sc  # (B, Hkv, group, L)
    valid = torch.arange(L, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # Positions past a sample's length hold stale (possibly non-finite) data; 0 * NaN
    # would leak into the weighted sum, so they are zeroed, not just given weight 0.
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    # An empty row has max -inf; shift by 0 instead so exp gives 0 / 0 -> guarded below.
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = o.reshape(B, Hq, Dh)
    o = o.to(q.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    if not return_lse:
        return o
    lse = torch.where(denom > 0, m + torch.log(torch.where(denom > 0, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf")))
    return o, lse.reshape(B, Hq)


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's normalised output
    and log-sum-exp (cascade / FlashInfer's merge_state):

        out = (e^(lse_a - M) o_a + e^(lse_b - M) o_b) / (e^(lse_a - M) + e^(lse_b - M)),
        M = max(lse_a, lse_b),

    exact because softmax over A u B weighs A's softmax by sum_A e^s / sum_{A u B} e^s.
    An empty set has lse -inf (weight 0); both empty gives 0, never NaN. o (B H Dh), lse
    (B H); math in fp32 (fp64 for fp64), the result in o_a's dtype.
    """
    cdt = _compute_dtype(o_a.dtype)
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    den = wa + wb
    o = (wa[..., None] * o_a.to(cdt) + wb[..., None] * o_b.to(cdt)) / torch.where(den > 0, den,
                                                                                 torch.ones_like(den))[..., None]
    o = o.to(o_a.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen2RMSNorm / Qwen2_5_VLRMSNorm exactly for fp16/bf16/fp32: normalise in fp32,
    cast back to the input dtype, THEN multiply by the weight (result dtype =
    promote(weight, hidden)). fp64 hidden states are normalised in fp64 (medlvr's fp64
    rule, medlvr/ops/_checks.py), where HF would round the statistic through fp32."""
    h = hidden.to(_compute_dtype(hidden.dtype))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(hidden.dtype)


def rmsnorm_feedback(hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, out: torch.Tensor,
                     active: torch.Tensor | None = None,
                     projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Final norm of the last hidden state, written into the next step's input buffer.

    out[b] = projector(normed[b]) (or normed[b]) for rows with active[b] (all rows when
    active is None); other rows of ``out`` keep their contents.
    Returns: without projector, ``out`` itself (its active rows hold normed); with a
    projector, the normed hidden states as a new (B, D) tensor (every row computed).
    """
    return write_feedback(rms_norm(hidden, weight, eps), out=out, active=active, projector=projector)


def write_feedback(normed: torch.Tensor, *, out: torch.Tensor, active: torch.Tensor | None = None,
                   projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The feedback half of ``rmsnorm_feedback`` for an already normed hidden state (any final
    norm: GPT-2's LayerNorm too): the same writes into ``out`` and the same return value."""
    fed = normed if projector is None else projector(normed)
    if active is None:
        out.copy_(fed)
    else:
        out.copy_(torch.where(active[:, None], fed.to(out.dtype), out))
    return out if projector is None else normed


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, *,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add of a pre-norm decoder layer followed by the next RMSNorm:

        new_residual = residual + x           (torch's promotion: dtype promote(residual, x))
        normed       = rms_norm(new_residual, weight, eps)

    exactly the two lines an HF layer runs (``hidden = residual + hidden`` then the norm),
    so the engine's unfused step and this give identical bits."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual
