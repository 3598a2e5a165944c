"""Reference of the fused lm_head log-prob op and the fused VLPO objective: the unfused path.

    fused_linear_logprobs_ref(hidden (N D), weight (V D), targets (N)) -> logp (N) [, entropy (N)]
    fused_linear_cross_entropy_ref(hidden (N D), weight (V D), targets (N)) -> loss ()
    fused_vlpo_loss_ref(hidden (R T D), weight (V D), tokens (R T), ...) -> (loss, token_logp (R T),
                                                                            latent_logp (R K))

All materialise the (N, V) logits ``hidden @ weight.T (+ bias)`` and hand them to
gather_logprobs_ref, which makes an fp32 copy: that is what the fast path in
medlvr/ops/fused_logprobs.py must equal without ever holding either tensor. The VLPO
objective here is written in closed form from the papers (the clipped surrogate's value and
gradient stated case by case), sharing no code with medlvr/ops/vlpo_loss.py, which the
op itself calls: a test of the op against it can fail.

The dtype contract of the op lives here too (:func:`compute_dtype`), because the reference is
the spec of which precision the lm_head GEMM runs in.
"""
from __future__ import annotations

import math

import torch

from medlvr.reference.logprobs import gather_logprobs_ref, latent_gaussian_logprob_ref

_LOW = (torch.float16, torch.bfloat16)


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the lm_head GEMM runs in (log-softmax math is fp32 whatever it is).

    - fp64 only with fp64 (gradcheck): anything else next to fp64 is an error.
    - Under ``torch.autocast`` on the tensors' device: the autocast dtype, as ``F.linear``
      would (typical: bf16 activations against fp32 master weights).
    - Otherwise equal dtypes run as they are, and fp32 next to bf16 / fp16 runs in the
      16-bit dtype (the weight, or the hidden states, is cast once); bf16 next to fp16 is
      refused, as there is no lossless common choice.
    """
    if torch.float64 in (hidden_dtype, weight_dtype):
        if hidden_dtype != weight_dtype:
            raise TypeError(f"weight must have the dtype of hidden when either is float64, got hidden "
                            f"{str(hidden_dtype)[6:]} and weight {str(weight_dtype)[6:]}")
        return torch.float64
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden_dtype == weight_dtype:
        return hidden_dtype
    if hidden_dtype in _LOW and weight_dtype in _LOW:
        raise TypeError(f"weight and hidden must not mix float16 and bfloat16, got hidden "
                        f"{str(hidden_dtype)[6:]} and weight {str(weight_dtype)[6:]}")
    return hidden_dtype if hidden_dtype in _LOW else weight_dtype


def fused_linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              ignore_index: int = -100, return_entropy: bool = False):
    """log_softmax((hidden @ weight.T + bias) / T)[targets] per row, through full logits.

    The logits are computed in :func:`compute_dtype` (so they carry the rounding the model's
    own lm_head would give them), then log-softmaxed in fp32 (fp64 for fp64).
    """
    c = compute_dtype(hidden.dtype, weight.dtype, hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.to(c), weight.to(c), None if bias is None else bias.to(c))
    return gather_logprobs_ref(logits, targets, temperature=temperature, ignore_index=ignore_index,
                               return_entropy=return_entropy)


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   weights: torch.Tensor | None = None, reduction: str = "mean",
                                   bias: torch.Tensor | None = None, temperature: float = 1.0,
                                   ignore_index: int = -100, return_logprobs: bool = False):
    """sum_i w_i CE_i ("sum"), or that / sum_i w_i ("mean", 0 when every row is ignored), over
    the rows whose target is not ignore_index, through full logits (w_i = weights[i], default 1)."""
    logp = fused_linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index)
    w = (targets != ignore_index).to(logp.dtype)
    if weights is not None:
        w = w * weights.to(logp.dtype)
    loss = -(w * logp).sum()
    if reduction == "mean":
        total = w.sum()
        loss = loss / torch.where(total != 0, total, torch.ones_like(total))
    return (loss, logp.detach()) if return_logprobs else loss


def _surrogate_closed_form(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, *, eps_low: float,
                           eps_high: float, dual_clip: float) -> torch.Tensor:
    """PPO's clipped surrogate per position (Schulman et al. 2017, eq. 7, with separate bounds as
    in DAPO, Yu et al. 2025, and the dual clip of Ye et al. 2020, eq. 5), value and gradient
    stated directly (no max / clamp whose tie-breaking would decide the gradient):

        r = exp(min(logp - old, 20))
        value = -A min(r, 1 + eps_high)                          A >= 0
                |A| min(max(r, 1 - eps_low), c)                 A < 0  (c = inf without dual clip)
        d value / d logp = -A r   where the unclipped branch holds (A >= 0: r <= 1 + eps_high;
                                  A < 0: 1 - eps_low <= r <= c, and log r <= 20), else 0

    so the on-policy position (r = 1) has gradient -A d logp for every eps >= 0."""
    log_r = logp.detach() - old
    r = torch.exp(torch.where(log_r > 20.0, torch.full_like(log_r, 20.0), log_r))
    hi, lo = 1.0 + eps_high, 1.0 - eps_low
    c = dual_clip if dual_clip > 0 else float("inf")
    pos = adv >= 0
    value = torch.where(pos, -adv * torch.where(r < hi, r, torch.full_like(r, hi)),
                        -adv * torch.where(r > lo, torch.where(r < c, r, torch.full_like(r, c)),
                                           torch.full_like(r, lo)))
    flows = torch.where(pos, r <= hi, (r >= lo) & (r <= c)) & (log_r <= 20.0)
    grad = torch.where(flows, -adv * r, torch.zeros_like(r))
    return value + grad * (logp - logp.detach())


def _k3_closed_form(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1, d = ref - logp (Schulman 2020's k3), continued above d = 20 by its tangent
    e^20 (d - 19) - d - 1 (finite, gradient never 0)."""
    d = ref - logp
    big = d > 20.0
    e = torch.exp(torch.where(big, torch.zeros_like(d), d))
    return torch.where(big, math.exp(20.0) * (d - 19.0), e) - d - 1.0


def fused_vlpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                        token_old: torch.Tensor | None, advantages: torch.Tensor, *, latent_old: torch.Tensor | None,
                        mu: torch.Tensor | None = None, z: torch.Tensor | None = None, latent_sigma: float = 0.0,
                        eps_low: float, eps_high: float, dual_clip: float, latent_coef: float,
                        kl_beta: float = 0.0, token_ref: torch.Tensor | None = None,
                        mu_ref: torch.Tensor | None = None, latent_scale: float | None = None,
                        temperature: float = 1.0,
                        bias: torch.Tensor | None = None):
    """The VLPO objective of one batch of rollouts, unfused: (loss, token_logp, latent_logp).

    Written from the papers, not from medlvr/ops/vlpo_loss.py (which the op calls), so
    that it checks the op rather than repeating it:

        l_text   = surrogate(logp, old, A) + kl_beta * k3(logp, ref)
        l_latent = surrogate(c logp_z, c old_z, A) + kl_beta * c * ||mu - mu_ref||^2 / (2 sigma^2)
        loss     = (sum over scored tokens of l_text + latent_coef * sum_r mean_k l_latent)
                   / max(1, #scored tokens)

    with c = latent_scale (None: sigma / sqrt(D), D = mu's last dim, the whitened per-dimension
    score of docs/vlpo.md; 1 without mu), logp_z = log N(z; mu, sigma^2 I) (the constant dropped). Shapes:
    hidden (R T D) are the states that predict the answer tokens (R T); mu / z / mu_ref (R K D)
    (mu None: no latent term, latent log-probs 0). token_old / latent_old None: on-policy, the
    computed log-probs detached (K from mu then). Sums run in the log-probs' dtype (fp64 for
    fp64 inputs, advantages included).
    """
    R, T = tokens.shape
    keep = token_mask.bool()
    logp = fused_linear_logprobs_ref(hidden[keep], weight, tokens[keep], bias=bias, temperature=temperature)
    token_logp = torch.zeros(R, T, dtype=logp.dtype, device=hidden.device).masked_scatter(keep, logp)
    K = latent_old.shape[1] if latent_old is not None else (0 if mu is None else mu.shape[1])
    if mu is not None and K > 0:
        D = mu.shape[-1]
        latent_logp = latent_gaussian_logprob_ref(mu.reshape(-1, D), z.reshape(-1, D), sigma=latent_sigma).view(R, K)
    else:
        latent_logp = torch.zeros(R, K, dtype=logp.dtype, device=hidden.device)
    token_old = token_logp.detach() if token_old is None else token_old
    latent_old = latent_logp.detach() if latent_old is None else latent_old
    adv = advantages.to(logp.dtype)[:, None]
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    l_text = _surrogate_closed_form(token_logp, token_old, adv, **clip)
    if kl_beta > 0:
        l_text = l_text + kl_beta * _k3_closed_form(token_logp, token_ref)
    n_text = keep.to(logp.dtype).sum()
    total = torch.where(keep, l_text, torch.zeros_like(l_text)).sum()
    if latent_coef > 0 and R * K > 0:
        c = latent_scale
        if c is None:
            c = latent_sigma / math.sqrt(mu.shape[-1]) if mu is not None and mu.shape[-1] > 0 else 1.0
        l_lat = _surrogate_closed_form(c * latent_logp, c * latent_old, adv, **clip)
        if kl_beta > 0 and mu is not None:
            diff = (mu.to(logp.dtype) - mu_ref.to(logp.dtype)) / latent_sigma
            l_lat = l_lat + kl_beta * c * 0.5 * (diff * diff).sum(-1)
        total = total + latent_coef * l_lat.mean(dim=1).sum()
    return total / torch.clamp(n_text, min=1.0), token_logp, latent_logp
