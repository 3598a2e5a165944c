"""Stage 2's objective, pure math (no model): group-normalised advantages, the PPO clipped
surrogate with clip-higher and dual clip, the KL to the reference (k3 for text tokens, the
closed-form Gaussian KL for latent steps), and their token-level mean over a batch of rollouts
(medlvr/train/vlpo/objective.py explains the method; docs/vlpo.md the recipe and the choices).

Production code: the trainer's unfused objective (medlvr/train/vlpo/step.py) and the fused
lm_head objective (medlvr/ops/fused_logprobs.py, via medlvr/ops/_fused_logprobs_sweep.py) both
call these very functions, so the two paths share one definition of the clip math. Their
specs live in medlvr/reference/: the objective's closed form in fused_logprobs.py
(``fused_vlpo_loss_ref``, tests/ops/test_fused_logprobs.py) and the group advantages in
vlpo_loss.py (tests/ops/test_vlpo_loss_spec.py).
"""
from __future__ import annotations

import math

import torch

from medlvr.ops import _checks

__all__ = ["group_advantages", "ppo_clip_loss", "kl_k3", "gaussian_kl", "latent_scale", "vlpo_loss", "check_terms"]

# exp() is only ever taken of min(log-ratio, 20). A ratio past e^20 = 4.9e8 lies outside every
# clip range (eps_high and the dual clip c are far below it), so with a positive advantage, or a
# negative one and the dual clip on, its gradient is zero with or without the cap; the cap only
# keeps a diverged position from giving inf (and inf * 0 = NaN). Inside the clip range the cap is
# the identity, so it never changes a gradient there (tests/train/test_vlpo_objective.py).
_MAX_LOG_RATIO = 20.0


def group_advantages(rewards: torch.Tensor, n: int, *, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of n consecutive rollouts.

    std is the population std (divide by n). A group whose rewards are all equal carries
    no learning signal and gets exactly zero advantage (not 0 / eps noise); so does n == 1.
    rewards: [G * n] -> [G * n] fp32 (fp64 for fp64 rewards).
    """
    _checks.finite_scalar("eps", eps, lambda v: v >= 0, "a finite eps >= 0")
    if rewards.dim() != 1 or rewards.numel() % n != 0:
        raise ValueError(f"rewards: expected a 1-D tensor whose length is a multiple of n={n}, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, n)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    flat = (r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True)) == 0
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.view(-1)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, eps_low: float,
                  eps_high: float, dual_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position clipped surrogate loss (to minimise) and where the clip was active.

    r = exp(logp - old_logp);  L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), i.e.
        A > 0:  L = -A min(r, 1 + eps_high)        clipped iff r > 1 + eps_high
        A < 0:  L = |A| max(r, 1 - eps_low)        clipped iff r < 1 - eps_low
    Dual clip (c > 1, Ye et al. 2020): for A < 0, L = min(L, -c A), active iff r > c.
    Written as this case split, not as max(), so that at a tie (r exactly on a bound, e.g. the
    on-policy r = 1 with eps = 0) the gradient is the unclipped one, -A r d log p, not half of
    it (max() splits a tie). Shapes broadcast (advantages [R, 1] against log-probs [R, T]).
    Returns (loss, clipped) with clipped a bool tensor: a clip branch is taken (zero gradient).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    a = advantages
    hi, lo = 1.0 + eps_high, 1.0 - eps_low
    clipped = ((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo))
    bound = torch.where(a > 0, torch.full_like(ratio, hi), torch.full_like(ratio, lo))
    loss = torch.where(clipped, -a * bound, -a * ratio)
    if dual_clip > 0:
        dual = (a < 0) & (ratio > dual_clip)
        loss = torch.where(dual, -a * dual_clip, loss)
        clipped = clipped | dual
    return loss, clipped


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per sampled position (Schulman 2020):
    exp(d) - d - 1 >= 0 with d = ref - logp, unbiased, zero iff logp == ref_logp.

    Exact for d <= 20. Above, exp(d) is continued by its tangent at 20 (e^20 (1 + d - 20)), so
    the value stays finite and the gradient keeps its sign and grows (e^20 - 1 > 0) instead
    of becoming 0 as a clamp of d would make it: the penalty never switches off at large drift.
    d < 0 needs nothing (exp underflows to 0, the gradient tends to -1)."""
    d = ref_logp - logp
    dc = d.clamp(max=_MAX_LOG_RATIO)
    return torch.exp(dc) * (1.0 + (d - dc)) - d - 1.0


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(mu, sigma^2 I) || N(mu_ref, sigma^2 I)) = ||mu - mu_ref||^2 / (2 sigma^2), exact, over
    the last dim: [..., D] -> [...] fp32 (fp64 for fp64). The latent policy's KL to the
    reference in closed form, so no sampled estimate (whose log-ratio sums over D dimensions)
    is ever exponentiated; its gradient (mu - mu_ref) / sigma^2 grows with the drift."""
    diff = mu.to(torch.promote_types(mu.dtype, torch.float32)) - mu_ref.to(torch.promote_types(mu_ref.dtype,
                                                                                              torch.float32))
    return diff.pow(2).sum(-1) / (2.0 * sigma * sigma)


def latent_scale(sigma: float, dim: int) -> float:
    """c = sigma / sqrt(D): the factor on every latent log-prob (and latent KL) in the objective.

    The score of a Gaussian mean is d log N(z; mu, sigma^2 I) / d mu = (z - mu) / sigma^2
    = eps / sigma, whose covariance is the Fisher information F = I / sigma^2 (the natural
    gradient, Kakade 2001 "A Natural Policy Gradient", preconditions by F^-1). Multiplying by
    F^(-1/2) = sigma whitens it to eps ~ N(0, I), of norm sqrt(D); dividing by sqrt(D) (a
    per-dimension mean, as GSPO, Zheng et al. 2025, normalises a sequence's log-ratio by its
    length) leaves a direction of norm ~1 per latent position, the scale of a text token's
    score (||onehot - p|| <= sqrt 2), whatever sigma and D. Unscaled, a latent position's
    gradient is sqrt(D) / sigma times a token's: noise that swamps the text term
    when the latents carry no information."""
    return float(sigma) / math.sqrt(dim) if dim > 0 and sigma > 0 else 1.0


def check_terms(*, eps_low, eps_high, dual_clip, latent_coef, kl_beta, latent_scale) -> None:
    """The objective's scalars, each finite and in its range, else a ValueError naming it: one
    definition for :func:`vlpo_loss` and medlvr.ops.fused_vlpo_loss. A NaN or inf here does not
    fail loudly by itself: it turns the loss into NaN (a NaN bound, an inf scale times a zero
    log-ratio) or silently switches a clip off (eps_high = inf)."""
    for name, v, ok, expected in (
            ("eps_low", eps_low, lambda v: 0 <= v < 1, "finite 0 <= eps_low < 1"),
            ("eps_high", eps_high, lambda v: v >= 0, "finite eps_high >= 0"),
            ("dual_clip", dual_clip, lambda v: v == 0 or v > 1, "dual_clip 0 (off) or finite > 1"),
            ("latent_coef", latent_coef, lambda v: v >= 0, "finite latent_coef >= 0"),
            ("kl_beta", kl_beta, lambda v: v >= 0, "finite kl_beta >= 0"),
            ("latent_scale", latent_scale, lambda v: v > 0, "finite latent_scale > 0")):
        _checks.finite_scalar(name, v, ok, expected)


def vlpo_loss(*, token_logp: torch.Tensor, token_old: torch.Tensor, token_mask: torch.Tensor,
              latent_logp: torch.Tensor, latent_old: torch.Tensor, advantages: torch.Tensor,
              eps_low: float, eps_high: float, dual_clip: float, latent_coef: float, kl_beta: float = 0.0,
              token_ref: torch.Tensor | None = None, latent_kl: torch.Tensor | None = None,
              latent_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The VLPO objective of a batch of rollouts: a mean over the answer tokens, plus each
    rollout's latent segment at a fixed weight.

    token_*: [R, T] (token_mask [R, T] marks scored tokens), latent_*: [R, K] (every latent
    position is scored), advantages: [R]; token_ref [R, T]: the reference's token log-probs
    and latent_kl [R, K]: the exact KL of each latent step to the reference
    (:func:`gaussian_kl`), both needed when kl_beta > 0.

        text token:  l = ppo_clip_loss(logp, old) + kl_beta * kl_k3(logp, ref)
        latent step: l = ppo_clip_loss(c logp, c old) + kl_beta * c * latent_kl,  c = latent_scale
        loss = (sum_text l + latent_coef * sum_rollouts mean_K l_latent) / #text tokens

    The divisor counts the answer tokens only (DAPO's token-level mean over them): a rollout's
    K latent steps together weigh latent_coef tokens whatever K is, so a longer latent segment
    does not dilute the answer's share of the gradient. latent_coef == 0 or K == 0 drops the
    latent term. c (:func:`latent_scale`, sigma / sqrt(D)) puts a latent step's score on a text
    token's scale; c = 1 is the raw Gaussian log-prob. The scalars are checked
    (:func:`check_terms`: finite, in range), the tensors are not read.
    """
    check_terms(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, latent_coef=latent_coef, kl_beta=kl_beta,
                latent_scale=latent_scale)
    m = token_mask.float()
    adv = advantages.to(torch.promote_types(advantages.dtype, torch.float32))[:, None]
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    t_loss, t_clip = ppo_clip_loss(token_logp, token_old, adv, **clip)
    n_text = m.sum()
    stats = {"clip_frac_text": float((t_clip.float() * m).sum() / n_text.clamp(min=1)),
             "ratio_text": float((torch.exp(token_logp - token_old).detach() * m).sum() / n_text.clamp(min=1))}
    if kl_beta > 0:
        if token_ref is None:
            raise ValueError("token_ref: expected reference log-probs when kl_beta > 0, got None")
        t_kl = kl_k3(token_logp, token_ref)
        t_loss = t_loss + kl_beta * t_kl
        stats["kl_text"] = float((t_kl.detach() * m).sum() / n_text.clamp(min=1))
    total = (t_loss * m).sum()
    K = latent_logp.shape[-1] if latent_logp.dim() == 2 else 0
    if latent_coef > 0 and latent_logp.numel() > 0:
        c = float(latent_scale)
        l_loss, l_clip = ppo_clip_loss(c * latent_logp, c * latent_old, adv, **clip)
        if kl_beta > 0:
            if latent_kl is None:
                raise ValueError("latent_kl: expected the latent steps' KL to the reference when kl_beta > 0, "
                                 "got None")
            l_loss = l_loss + kl_beta * c * latent_kl
            stats["kl_latent"] = float(latent_kl.detach().mean())
        total = total + latent_coef * l_loss.sum() / K
        stats["clip_frac_latent"] = float(l_clip.float().mean())
        stats["log_ratio_latent"] = float((latent_logp - latent_old).detach().mean())
    loss = total / n_text.clamp(min=1)
    stats["loss"] = float(loss.detach())
    return loss, stats
