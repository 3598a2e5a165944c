"""Token log-probs straight from hidden states and the lm_head weight, and the VLPO objective on
top of them, without ever materialising the (N, V) logits.

    fused_linear_logprobs(hidden (N D), weight (V D), targets (N)) -> logp (N) fp32 [, entropy (N)]
    fused_linear_cross_entropy(hidden (N D), weight (V D), targets (N)) -> loss (): stage 1's answer loss
    fused_vlpo_loss(hidden (R T D), weight (V D), tokens (R T), ...) -> (loss, token_logp (R T),
                                                                        latent_logp (R K)): VLPO's
    lm_head_logprobs(lm_head, hidden (N D), targets (N)) -> logp (N): scoring without a gradient

Reference (the unfused spec): medlvr/reference/fused_logprobs.py. Run path, the same code on
CPU and CUDA: medlvr/ops/_fused_logprobs_sweep.py (chunked MKL / cuBLAS GEMMs and the medlvr._C
log-prob kernel, registered as torch.ops.medlvr.fused_*). Benchmark:
benchmarks/bench_fused_logprobs.py; tests: tests/ops/test_fused_logprobs.py.

Schedules. ``fused_linear_logprobs`` returns per-token values whose upstream gradient is only
known in the backward, so the forward keeps (lse, entropy) per row and the backward recomputes
each chunk's logits: 4 GEMMs in all, against 3 for an unfused path that keeps the logits.
``fused_vlpo_loss`` and ``fused_linear_cross_entropy`` return a scalar whose d loss / d logp_i
depends on row i alone; they get the chunk's gradient as soon as the chunk's log-probs exist and
do all three GEMMs in the forward (the Liger schedule): 3 GEMMs, and the backward only scales
the saved gradients. No per-token op can do better than 4: d W = sum_i g_i (e_{y_i} - p_i) h_i^T
needs every row's full softmax p_i weighted by an upstream g_i that arrives only in the
backward, so either the (N, V) probabilities are kept or the logits are recomputed. The
trainers therefore call the scalar ops; the per-token op serves scoring under no_grad (old and
reference log-probs: 1 GEMM) and callers that need per-token gradients.

Dtype contract. hidden and weight (and bias) may differ in dtype; the GEMMs run in
medlvr.ops._checks.compute_dtype (its spec: medlvr/reference/fused_logprobs.py): the autocast
dtype under torch.autocast (as F.linear would), else the common dtype, else the 16-bit one of
an fp32 / bf16|fp16 pair (the other operand is cast once, a (V, D) copy when it is the
weight); bf16 with fp16, and fp64 with anything else, are refused. Softmax math is fp32 (fp64
for fp64); log-probs, entropy and the loss come out fp32 (fp64). Gradients come back in each
input's own dtype. Peak memory beyond the inputs and their gradients is one (C, V) chunk of
logits in the compute dtype (C from a byte budget, or ``chunk_size``) plus O(N) statistics
(plus that one cast copy, if any).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medlvr.ops import _checks
from medlvr.ops import _fused_logprobs_sweep as sweep
from medlvr.ops.logprobs import gather_logprobs, latent_gaussian_logprob
from medlvr.ops._checks import compute_dtype
from medlvr.ops._vlpo_checks import check_vlpo
from medlvr.reference.fused_logprobs import (fused_linear_cross_entropy_ref, fused_linear_logprobs_ref,
                                             fused_vlpo_loss_ref)
from medlvr.ops.vlpo_loss import gaussian_kl, ppo_clip_loss

__all__ = [
    "fused_linear_cross_entropy", "fused_linear_logprobs", "fused_vlpo_loss", "fusable_lm_head", "lm_head_logprobs",
]

# Bytes of the one logits buffer: large enough that a chunk's GEMMs run near full rate, small
# against the 512 MB target of the whole op on a GPU (C ~ 800 rows for V = 152064 bf16) and a
# quarter of the unfused path's extra memory on a CPU (C = 256 rows fp32 at N = 512). On a CPU
# every chunk re-reads W and read-modify-writes d W, which is what costs there (measured on
# 2 cores at N = 512, D = 896: the 3 GEMMs chunked by 128 / 256 / 512 rows took 1.26 / 1.11 /
# 1.03x their unchunked time); benchmarks/bench_fused_logprobs.py measures time and memory.
_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 160 * 2**20}


@dataclass(frozen=True)
class _Plan:
    inv_t: float
    ignore_index: int
    chunk: int
    compute: torch.dtype
    need: tuple  # (d hidden, d weight, d bias) wanted
    with_entropy: bool = False


class _FusedLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs (objective None: the backward recomputes the logits chunk by chunk)
    or a scalar objective of them (objective = a sweep head, e.g. VLPO's token part or a
    cross-entropy: the forward computes the gradients, the backward scales them by the
    incoming scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: _Plan, objective: "sweep.Head | None"):
        ctx.plan, ctx.objective = plan, objective
        if objective is None:
            logp, lse, ent = torch.ops.medlvr.fused_logprobs_fwd(hidden, weight, bias, targets, plan.inv_t,
                                                                 plan.ignore_index, plan.with_entropy, plan.chunk,
                                                                 plan.compute)
            ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
            if not plan.with_entropy:
                ctx.mark_non_differentiable(ent)
            return logp, ent
        loss, logp, dh, dw, db = sweep.objective_forward_backward(
            hidden, weight, bias, targets, objective, inv_temperature=plan.inv_t, ignore_index=plan.ignore_index,
            chunk=plan.chunk, compute_dtype=plan.compute, need=plan.need)
        # Plain attributes, not save_for_backward: the backward drops them from ctx and hands
        # the only reference to autograd, which can adopt it as .grad instead of copying (V, D).
        ctx.grads = [g if need else None for g, need in zip((dh, dw, db), plan.need)]
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        plan = ctx.plan
        if ctx.objective is not None:
            if ctx.grads is None:
                raise RuntimeError("fused loss: its backward runs once (the gradients were computed in the "
                                   "forward and handed out); recompute the loss to differentiate it again")
            grads, ctx.grads = ctx.grads, None
            # d loss was computed for an upstream gradient of 1 (the usual loss.backward()); the
            # check is free on CPU, a host sync on CUDA, so there the scale is always applied.
            if not (grad_a.device.type == "cpu" and bool(grad_a == 1)):
                grads = [None if g is None else g.mul_(grad_a.to(g.dtype)) for g in grads]
            return (*grads, None, None, None)
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return None, None, None, None, None, None
        if grad_a is None:
            grad_a = torch.zeros_like(lse)
        dh, dw, db = torch.ops.medlvr.fused_logprobs_bwd(
            grad_a, grad_b if plan.with_entropy else None, hidden, weight, bias, targets, lse, ent, plan.inv_t,
            plan.ignore_index, plan.chunk, plan.compute, *need)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None)


def _chunk_rows(n: int, v: int, dtype: torch.dtype, device: torch.device, chunk_size) -> int:
    """Rows per chunk: from the byte budget of the logits buffer, balanced so the last chunk is
    not a sliver (N = 513 with a budget of 256 rows runs as 3 x 171, not 256 + 256 + 1)."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        return chunk_size
    elt = torch.finfo(dtype).bits // 8
    cmax = max(1, _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"]) // max(1, v * elt))
    k = max(1, -(-n // cmax))
    return max(1, -(-n // k))


def _check_linear(hidden, weight, bias, targets, ignore_index, targets_name="targets") -> torch.dtype:
    _checks.tensor("hidden", hidden, dims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, dims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(targets_name, targets, dims=1, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device("weight", weight, "hidden", hidden)
    _checks.same_device(targets_name, targets, "hidden", hidden)
    (N, D), V = hidden.shape, weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight must be (V, D) with D = {D} (hidden's last dim), got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError("weight must have at least one row (V > 0), got V = 0")
    if targets.shape[0] != N:
        raise ValueError(f"{targets_name} must have N = {N} entries (one per hidden row), got {targets.shape[0]}")
    if bias is not None:
        _checks.tensor("bias", bias, dims=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_device("bias", bias, "hidden", hidden)
        if bias.shape[0] != V:
            raise ValueError(f"bias must be (V,) with V = {V} (weight's rows), got {tuple(bias.shape)}")
    c = compute_dtype(hidden.dtype, weight.dtype, hidden.device.type)
    if bias is not None and bias.dtype == torch.float64 and c != torch.float64:
        raise TypeError(f"bias must not be float64 when hidden and weight are {str(c)[6:]}")
    _checks.targets_in_range(targets_name, targets, V, ignore_index)
    return c


def _plan(hidden, weight, bias, c, temperature, ignore_index, chunk_size, with_entropy=False) -> _Plan:
    grad = torch.is_grad_enabled()
    need = tuple(bool(grad and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    chunk = _chunk_rows(hidden.shape[0], weight.shape[0], c, hidden.device, chunk_size)
    return _Plan(1.0 / temperature, ignore_index, chunk, c, need, with_entropy)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, chunk_size: int | None = None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets] per row, fp32, no logits tensor.

    Args:
        hidden: (N, D) float, the states that predict the targets (N may be 0).
        weight: (V, D) float, the lm_head weight (tied or not); dtype rules in the module doc.
        targets: (N,) int32/int64 in [0, V), or ``ignore_index`` (log-prob and entropy 0, no
            gradient).
        bias: (V,) or None, the lm_head bias.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return each row's entropy of that distribution (differentiable).
        chunk_size: rows per chunk (default: a (C, V) logits buffer of <= 160 MiB on CPU, 256 MiB on CUDA).
    Returns:
        logp (N,) fp32 (fp64 for fp64 inputs), and entropy (N,) when ``return_entropy``.
    Gradients flow to hidden, weight and bias.
    """
    temperature = _checks.positive_float("temperature", temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    c = _check_linear(hidden, weight, bias, targets, ignore_index)
    backend = _checks.backend("fused_linear_logprobs", hidden.device, has_ext=True, hidden=hidden, weight=weight,
                              bias=bias)
    if backend == "reference":
        return fused_linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    plan = _plan(hidden, weight, bias, c, temperature, ignore_index, chunk_size, bool(return_entropy))
    logp, ent = _FusedLinearLogprobs.apply(hidden, weight, bias, targets, plan, None)
    return (logp, ent) if return_entropy else logp


def fusable_lm_head(lm_head: torch.nn.Module) -> bool:
    """True for a plain ``nn.Linear`` (its forward not replaced): only then is lm_head(h) exactly
    h @ weight.T + bias, which the fused ops compute from the weight. A LoRA or quantised
    wrapper, or a replaced forward (accelerate's offload hook), must run its own forward (the
    unfused path)."""
    return type(lm_head) is torch.nn.Linear and "forward" not in vars(lm_head)


def lm_head_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                     temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """log_softmax(lm_head(hidden) / temperature)[targets] per row, fp32: what VLPO's token
    log-probs and stage 1's answer cross-entropy (its negative) are made of.

    A plain ``nn.Linear`` runs fused (:func:`fused_linear_logprobs` on its weight and bias);
    any other module (a LoRA or quantised wrapper, a hooked forward) runs as ``lm_head(hidden)``
    followed by ``gather_logprobs``, the unfused path, so its own forward is honoured.
    """
    if fusable_lm_head(lm_head):
        return fused_linear_logprobs(hidden, lm_head.weight, targets, bias=lm_head.bias, temperature=temperature,
                                     ignore_index=ignore_index)
    return gather_logprobs(lm_head(hidden), targets, temperature=temperature, ignore_index=ignore_index)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               weights: torch.Tensor | None = None, reduction: str = "mean",
                               bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                               chunk_size: int | None = None, return_logprobs: bool = False):
    """Cross-entropy of (hidden @ weight.T + bias) / temperature against targets, reduced to one
    scalar, with every gradient computed in the forward (3 GEMMs per chunk, no logits tensor).

        CE_i = -log_softmax((h_i W^T + b) / temperature)[targets_i]
        "sum":  loss = sum_i w_i CE_i
        "mean": loss = sum_i w_i CE_i / sum_i w_i      (0, not NaN, when every row is ignored)

    over the rows whose target is not ``ignore_index``; w_i = ``weights[i]`` (default 1, so
    "mean" is F.cross_entropy's mean). A per-sample mean of per-token CEs, averaged over B
    samples, is ``weights = 1 / (B * n_sample(i))`` with "sum" (stage 1's answer loss).

    Args: as :func:`fused_linear_logprobs`; weights: (N,) float, no gradient; reduction:
        "mean" | "sum"; return_logprobs: also return the per-row log-probs (N,), detached.
    Returns:
        loss, a 0-dim fp32 tensor (fp64 for fp64 inputs) [, logp (N,)]. Its backward runs once.
    """
    temperature = _checks.positive_float("temperature", temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.choice("reduction", reduction, ("mean", "sum"))
    c = _check_linear(hidden, weight, bias, targets, ignore_index)
    if weights is not None:
        _checks.tensor("weights", weights, dims=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_device("weights", weights, "hidden", hidden)
        _checks.shape("weights", weights, (hidden.shape[0],))
    backend = _checks.backend("fused_linear_cross_entropy", hidden.device, has_ext=True, hidden=hidden,
                              weight=weight, bias=bias)
    if backend == "reference":
        return fused_linear_cross_entropy_ref(hidden, weight, targets, weights=weights, reduction=reduction, bias=bias,
                                              temperature=temperature, ignore_index=ignore_index,
                                              return_logprobs=return_logprobs)
    stat = torch.float64 if c == torch.float64 else torch.float32
    w = (targets != ignore_index).to(stat)
    if weights is not None:
        w = w * weights.to(stat)
    if reduction == "mean":
        total = w.sum()
        w = w / torch.where(total != 0, total, torch.ones_like(total))  # no host sync for the empty case
    plan = _plan(hidden, weight, bias, c, temperature, ignore_index, chunk_size)
    loss, logp = _FusedLinearLogprobs.apply(hidden, weight, bias, targets, plan, sweep.weighted_sum_head(-w))
    return (loss, logp) if return_logprobs else loss


def fused_vlpo_loss(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                    token_old: torch.Tensor | None, advantages: torch.Tensor, *, latent_old: torch.Tensor | None,
                    mu: torch.Tensor | None = None, z: torch.Tensor | None = None, latent_sigma: float = 0.0,
                    eps_low: float, eps_high: float, dual_clip: float, latent_coef: float, kl_beta: float = 0.0,
                    token_ref: torch.Tensor | None = None, mu_ref: torch.Tensor | None = None,
                    latent_scale: float | None = None, temperature: float = 1.0, bias: torch.Tensor | None = None,
                    chunk_size: int | None = None):
    """medlvr.ops.vlpo_loss.vlpo_loss of one batch of R rollouts, straight from hidden states.

    Args (the layout of vlpo_loss and rollout.policy_states):
        hidden: (R, T, D) the states predicting answer token t of rollout r (policy_states' answer).
        weight / bias: the lm_head's. tokens: (R, T) sampled ids; token_mask: (R, T) bool, the
            scored tokens (a scored token must be a real id, never -100). token_old / token_ref:
            (R, T) old / reference log-probs; token_old None: on-policy, old = the log-probs
            computed here, detached (PPO's first epoch: ratio exactly 1, gradient A), which saves
            the caller a no-grad scoring pass.
        advantages: (R,). latent_old: (R, K) old latent log-probs; None: on-policy likewise, K
            taken from mu (0 without mu).
        mu, z: (R, K, D) the current policy's latent means (mu_t from position s0 + t - 1) and
            the latents the rollout fed back; None for no latent log-prob (then 0, as
            policy_states gives for sigma = 0). latent_sigma: > 0 when mu is given. mu_ref:
            (R, K, D) the reference policy's latent means (the latent KL is exact:
            ||mu - mu_ref||^2 / (2 sigma^2)), needed when kl_beta > 0 and the latent term is on.
        eps_low, eps_high, dual_clip, latent_coef, kl_beta: as VLPOConfig; latent_scale: the
            factor c on the latent log-probs and the latent KL. None (default): c = latent_sigma /
            sqrt(D), D = mu's last dim (medlvr.ops.vlpo_loss.latent_scale; 1 without mu), the
            objective docs/vlpo.md documents and VLPOConfig's latent_norm=True gives; 1.0 is the
            raw Gaussian log-prob, whose latent gradient is sqrt(D) / sigma times a token's
            (docs/vlpo.md measures it swamping the text gradient).
    Every argument is checked before the first GEMM (medlvr/ops/_vlpo_checks.py): a NaN or
    inf scalar, advantage, old / reference log-prob (at a scored position) or reference
    latent mean is a ValueError naming it, not a NaN loss.
    Returns:
        (loss, token_logp (R, T), latent_logp (R, K)): the scalar loss, fp32 (fp64 for fp64
        inputs; gradients to hidden, weight, bias and mu), and the detached log-probs (old
        log-probs for later epochs, stats).
    """
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    K, latent_sigma, temperature, latent_scale = check_vlpo(
        hidden, tokens, token_mask, token_old, advantages, latent_old, mu, z, token_ref, mu_ref,
        latent_sigma=latent_sigma, temperature=temperature, latent_coef=latent_coef, kl_beta=kl_beta,
        latent_scale=latent_scale, **clip)
    R, T, D = hidden.shape
    keep = token_mask.bool()
    h, tgt = hidden[keep], tokens[keep]
    c = _check_linear(h, weight, bias, tgt, -100, "tokens[token_mask]")
    if _checks.backend("fused_vlpo_loss", hidden.device, has_ext=True, hidden=hidden, weight=weight) == "reference":
        return fused_vlpo_loss_ref(hidden, weight, tokens, token_mask, token_old, advantages, latent_old=latent_old,
                                   mu=mu, z=z, latent_sigma=latent_sigma, eps_low=eps_low, eps_high=eps_high,
                                   dual_clip=dual_clip, latent_coef=latent_coef, kl_beta=kl_beta,
                                   token_ref=token_ref, mu_ref=mu_ref, latent_scale=latent_scale,
                                   temperature=temperature, bias=bias)

    # vlpo_loss's divisor: the scored text tokens (latent steps do not count, see vlpo_loss).
    stat = torch.float64 if c == torch.float64 else torch.float32
    denominator = keep.to(stat).sum().clamp(min=1)
    adv = advantages.to(stat)[:, None]
    # Only the scored tokens enter the sweep (h = hidden[keep]), so every row counts.
    objective = sweep.vlpo_head(None if token_old is None else token_old[keep],
                                None if kl_beta <= 0 else token_ref[keep], adv.expand(R, T)[keep], denominator,
                                kl_beta=kl_beta, **clip)
    plan = _plan(h, weight, bias, c, temperature, -100, chunk_size)
    loss, logp = _FusedLinearLogprobs.apply(h, weight, bias, tgt, plan, objective)
    token_logp = torch.zeros(R, T, dtype=logp.dtype, device=hidden.device).masked_scatter(keep, logp)

    if mu is not None and K > 0:
        latent_logp = latent_gaussian_logprob(mu.reshape(-1, D), z.reshape(-1, D), sigma=latent_sigma).view(R, K)
    else:
        latent_logp = torch.zeros(R, K, dtype=stat, device=hidden.device)
    if latent_coef > 0 and R * K > 0:
        old = latent_logp.detach() if latent_old is None else latent_old
        lat, _ = ppo_clip_loss(latent_scale * latent_logp, latent_scale * old, adv, **clip)
        if kl_beta > 0 and mu is not None:
            lat = lat + kl_beta * latent_scale * gaussian_kl(mu, mu_ref, latent_sigma)
        loss = loss + latent_coef * lat.sum() / K / denominator
    return loss, token_logp, latent_logp.detach()

