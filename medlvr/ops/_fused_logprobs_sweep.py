"""Run path of medlvr.ops.fused_logprobs: the chunked lm_head sweep (the same code on CPU and CUDA).

One sweep walks the N rows of ``hidden`` in chunks of C rows. Per chunk:

    x = h_c W^T (+ b)                    one GEMM (MKL on CPU, cuBLAS on CUDA) into ONE (C, V)
                                         buffer reused by every chunk
    logprobs_fwd(x)                      the medlvr._C log-prob kernel (csrc/logprobs_cpu.cpp,
                                         csrc/logprobs_cuda.cu): online logsumexp over V in fp32
    logprobs_bwd_(g, x)                  the same kernel's backward, written over the buffer:
                                         x <- d l = (g (onehot - p) - ge p (log p + H)) / T
    d h_c = x W                          GEMM, rows disjoint across chunks
    d W  += x^T h_c                      GEMM with beta = 1 (addmm_; the first chunk's with beta = 0),
    d b  += sum_rows x                   chunks in a fixed order, so the result is bitwise
                                         reproducible (no atomics)

so at no time does more than one chunk of logits exist. Three entry points use it:

- ``fused_logprobs_fwd`` (torch.ops.medlvr.fused_logprobs_fwd): log-probs, lse (and
  entropy) only, 1 GEMM per chunk;
- ``fused_logprobs_bwd`` (torch.ops.medlvr.fused_logprobs_bwd): the backward for an upstream
  g known only then: recompute x from the saved lse, then the three steps above (3 GEMMs
  per chunk);
- ``objective_forward_backward``: a scalar objective whose d loss / d logp_i depends on row i
  alone, so a chunk's g is known as soon as its log-probs are: the forward does all 3 GEMMs
  per chunk (the Liger schedule) and nothing is recomputed. Two heads give that g:
  ``vlpo_head`` (VLPO's clipped ratio + KL: the functions of medlvr/ops/vlpo_loss.py,
  differentiated by autograd on the (C,) log-prob vector, so the trainer's unfused path and
  this op share one definition of the clip math; the op's test oracle is the closed form of
  medlvr/reference/fused_logprobs.py) and ``weighted_sum_head`` (sum_i w_i logp_i: cross-entropy, per-sample means).

Inputs arrive in their own dtypes and are cast once to ``compute_dtype`` (the rule is
medlvr.ops._checks.compute_dtype, its spec medlvr/reference/fused_logprobs.py); gradients leave in each input's dtype, d W
accumulated in the weight's dtype (beside a bf16/fp16 GEMM into an fp32 weight: the product
computed a slice of V rows at a time into one 64 MiB buffer and added into the fp32 gradient).
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

# The log-prob kernels of medlvr._C must be registered before these ops run; importing the
# extension does that (the wrapper only dispatches here when it was built).
from medlvr import _backend
from medlvr.ops.vlpo_loss import kl_k3, ppo_clip_loss

Head = Callable[[slice, Tensor], Tuple[Tensor, Tensor]]

# Bytes of the buffer through which a 16-bit d W product reaches an fp32 weight gradient
# (autocast over fp32 master weights): 64 MiB, V / 9362 slices at D = 3584 bf16, each GEMM
# still (9362 x C x D), against a (V, D) temporary of 1.09 GB at Qwen2.5-7B's lm_head.
_DW_SLICE_BYTES = 64 * 2**20


def _stat_dtype(c: torch.dtype) -> torch.dtype:
    return torch.float64 if c == torch.float64 else torch.float32


def _cast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], c: torch.dtype):
    return hidden.to(c), weight.to(c), None if bias is None else bias.to(c)


def _accumulate_dw(dw: Tensor, x: Tensor, hc: Tensor, tmp: Optional[Tensor], *, first: bool) -> None:
    """d W (+)= x^T hc for one chunk (x: its d logits). The first chunk writes d W (beta = 0)."""
    if tmp is None:  # d W in the compute dtype: one GEMM straight into it
        torch.mm(x.t(), hc, out=dw) if first else dw.addmm_(x.t(), hc)
        return
    # bf16/fp16 GEMM into an fp32 gradient: the product goes through one small buffer, a
    # slice of V at a time, never a (V, D) temporary.
    V = dw.shape[0]
    for v0 in range(0, V, tmp.shape[0]):
        vs = slice(v0, min(V, v0 + tmp.shape[0]))
        prod = torch.mm(x[:, vs].t(), hc, out=tmp[:vs.stop - v0])
        dw[vs].copy_(prod) if first else dw[vs].add_(prod)


def _sweep(h: Tensor, w: Tensor, b: Optional[Tensor], targets: Tensor, *, inv_t: float, ignore_index: int,
           chunk: int, with_entropy: bool = False, stats: Optional[Tuple[Tensor, Tensor]] = None,
           grad_logp: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None, head: Optional[Head] = None,
           need: Tuple[bool, bool, bool] = (False, False, False), dw_dtype: Optional[torch.dtype] = None):
    """One pass over the rows of h (already in the compute dtype).

    stats = (lse, entropy) of an earlier forward makes this a backward (the log-prob kernel's
    forward is skipped); grad_logp / grad_entropy are then the upstream gradients. head(rows,
    logp_chunk) -> (loss_chunk, g_chunk) makes it a forward that also computes gradients.
    need: which of (d h, d W, d b) to produce. Returns (logp, lse, entropy, loss, dh, dw, db).
    """
    _backend.extension()
    N, D = h.shape
    V = w.shape[0]
    dev, c = h.device, h.dtype
    stat = _stat_dtype(c)
    forward = stats is None
    grads = head is not None or grad_logp is not None
    need_h, need_w, need_b = need if grads else (False, False, False)
    if forward:
        logp = torch.zeros(N, dtype=stat, device=dev)
        lse = torch.zeros(N, dtype=stat, device=dev)
        ent = torch.zeros(N if with_entropy else 0, dtype=stat, device=dev)
    else:
        logp = None
        lse, ent = stats
    loss = torch.zeros((), dtype=stat, device=dev)
    dh = torch.empty(N, D, dtype=c, device=dev) if need_h else None
    # d W is written by the first chunk's GEMM (beta = 0), so it needs no zero fill unless
    # there is no chunk at all: one pass over (V, D) less.
    dw = (torch.empty if N else torch.zeros)(V, D, dtype=dw_dtype or c, device=dev) if need_w else None
    db = torch.zeros(V, dtype=stat, device=dev) if need_b else None
    buf = torch.empty(min(chunk, N), V, dtype=c, device=dev) if N else None
    tmp = None
    if need_w and N and dw.dtype != c:
        tmp = torch.empty(max(1, min(V, _DW_SLICE_BYTES // (D * c.itemsize))), D, dtype=c, device=dev)
    wt = w.t()  # a view: BLAS reads W^T without a copy
    with torch.autocast(dev.type, enabled=False):  # the dtypes were chosen by the caller
        for r0 in range(0, N, chunk):
            rows = slice(r0, min(N, r0 + chunk))
            x = buf[:rows.stop - r0]
            hc, tc = h[rows], targets[rows]
            if b is None:
                torch.mm(hc, wt, out=x)
            else:
                torch.addmm(b, hc, wt, out=x)
            if forward:
                lp_c, lse_c, ent_c = torch.ops.medlvr.logprobs_fwd(x, tc, inv_t, ignore_index, with_entropy)
                logp[rows], lse[rows] = lp_c, lse_c
                if with_entropy:
                    ent[rows] = ent_c
            if not grads:
                continue
            if head is not None:
                l_c, g_c = head(rows, lp_c)
                loss += l_c
                if not (need_h or need_w or need_b):
                    continue  # a loss under no_grad (or of frozen inputs): d logits would feed no GEMM
                ge_c = None
            else:
                g_c = grad_logp[rows]
                ge_c = None if grad_entropy is None else grad_entropy[rows]
            # d logits over the logits buffer: the chunk's logits are not needed after this.
            torch.ops.medlvr.logprobs_bwd_(g_c, ge_c, x, tc, lse[rows], None if ge_c is None else ent[rows],
                                           inv_t, ignore_index)
            if need_h:
                torch.mm(x, w, out=dh[rows])
            if need_w:
                _accumulate_dw(dw, x, hc, tmp, first=r0 == 0)
            if need_b:
                db += x.sum(0, dtype=stat)
    return logp, lse, ent, loss, dh, dw, db


def _grads_out(dh, dw, db, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Gradients in the dtypes of their inputs; an empty tensor (one each: a custom op's outputs
    must not alias) stands for "not computed"."""
    def empty():
        return hidden.new_empty((0,))
    return (empty() if dh is None else dh.to(hidden.dtype), empty() if dw is None else dw.to(weight.dtype),
            empty() if db is None else db.to(bias.dtype))


@torch.library.custom_op("medlvr::fused_logprobs_fwd", mutates_args=())
def fused_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
                       ignore_index: int, with_entropy: bool, chunk: int, compute_dtype: torch.dtype
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) per row, fp32 (fp64 for fp64); entropy is (0,) unless asked."""
    h, w, b = _cast(hidden, weight, bias, compute_dtype)
    logp, lse, ent, *_ = _sweep(h, w, b, targets, inv_t=inv_temperature, ignore_index=ignore_index, chunk=chunk,
                                with_entropy=with_entropy)
    return logp, lse, ent


@fused_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, inv_temperature, ignore_index, with_entropy, chunk, compute_dtype):
    n, stat = hidden.shape[0], _stat_dtype(compute_dtype)
    return (hidden.new_empty((n,), dtype=stat), hidden.new_empty((n,), dtype=stat),
            hidden.new_empty((n if with_entropy else 0,), dtype=stat))


@torch.library.custom_op("medlvr::fused_logprobs_bwd", mutates_args=())
def fused_logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
                       bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float,
                       ignore_index: int, chunk: int, compute_dtype: torch.dtype, need_hidden: bool,
                       need_weight: bool, need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) for upstream (grad_logp, grad_entropy): the logits are
    recomputed chunk by chunk from the forward's lse (and entropy)."""
    h, w, b = _cast(hidden, weight, bias, compute_dtype)
    *_, dh, dw, db = _sweep(h, w, b, targets, inv_t=inv_temperature, ignore_index=ignore_index, chunk=chunk,
                            stats=(lse, entropy), grad_logp=grad_logp, grad_entropy=grad_entropy,
                            need=(need_hidden, need_weight, need_bias and bias is not None), dw_dtype=weight.dtype)
    return _grads_out(dh, dw, db, hidden, weight, bias)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    def empty():
        return hidden.new_empty((0,))
    return (torch.empty_like(hidden) if need_hidden else empty(), torch.empty_like(weight) if need_weight else empty(),
            torch.empty_like(bias) if need_bias and bias is not None else empty())


@fused_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, inv_temperature, ignore_index, chunk,
      compute_dtype, need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def vlpo_token_terms(logp: Tensor, old: Tensor, ref: Optional[Tensor], adv: Tensor, *, eps_low: float,
                     eps_high: float, dual_clip: float, kl_beta: float) -> Tensor:
    """Per-position VLPO loss: ppo_clip_loss + kl_beta * kl_k3, the functions of
    medlvr/ops/vlpo_loss.py, combined as its vlpo_loss combines them."""
    pg, _ = ppo_clip_loss(logp, old, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    return pg if kl_beta <= 0 else pg + kl_beta * kl_k3(logp, ref)


def vlpo_head(old_logp: Optional[Tensor], ref_logp: Optional[Tensor], advantages: Tensor, denominator: Tensor, *,
              eps_low: float, eps_high: float, dual_clip: float, kl_beta: float) -> Head:
    """The token part of VLPO's loss over rows that are all scored, sum_i l_i / denominator with
    l_i = vlpo_token_terms(logp_i, old_i, ref_i, adv_i); old_logp None means on-policy (old =
    the log-probs being computed, detached: PPO's first epoch, ratio exactly 1).

    d loss / d logp of a chunk is autograd through the very functions vlpo_loss uses, so there
    is one definition of the clip math."""
    terms = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, kl_beta=kl_beta)

    def head(rows: slice, lp: Tensor):
        with torch.enable_grad():
            x = lp.detach().requires_grad_(True)
            old = lp.detach() if old_logp is None else old_logp[rows]
            ref = None if ref_logp is None else ref_logp[rows]
            s = vlpo_token_terms(x, old, ref, advantages[rows], **terms).sum() / denominator
            (g,) = torch.autograd.grad(s, x)
        return s.detach(), g
    return head


def weighted_sum_head(weights: Tensor) -> Head:
    """loss = sum_i w_i logp_i, so d loss / d logp_i = w_i: a cross-entropy is w_i = -1 / n
    (mean) or -1 (sum), and any per-row weighting (per-sample means) is a choice of w."""
    def head(rows: slice, lp: Tensor):
        w = weights[rows]
        return (w * lp).sum(), w
    return head


def objective_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, head: Head, *,
                               inv_temperature: float, ignore_index: int, chunk: int, compute_dtype: torch.dtype,
                               need: Tuple[bool, bool, bool]):
    """(loss, logp, d hidden, d weight, d bias) of a scalar loss = sum over chunks of
    head(rows, logp[rows])[0], whose d loss / d logp_i (head's second output) depends on row i
    alone: all three GEMMs of a chunk run as soon as its log-probs exist, nothing is recomputed.

    Not a registered op: a head may differentiate through torch functions (vlpo_head), and a
    custom op's kernel runs below autograd. Its kernels (the GEMMs and the medlvr._C log-prob
    kernels) are registered ops each.
    """
    h, w, b = _cast(hidden, weight, bias, compute_dtype)
    logp, _, _, loss, dh, dw, db = _sweep(h, w, b, targets, inv_t=inv_temperature, ignore_index=ignore_index,
                                          chunk=chunk, head=head, need=(need[0], need[1], need[2] and bias is not None),
                                          dw_dtype=weight.dtype)
    return (loss, logp, *_grads_out(dh, dw, db, hidden, weight, bias))
