"""Stage 2's objective, pure math (no model): group-normalised advantages, the PPO clipped
surrogate with clip-higher and dual clip, the k3 KL estimator, and their token-level mean over
the text and latent positions of a batch of rollouts (medlvr/train/vlpo.py explains the method;
docs/vlpo.md the recipe).

It lives beside the op references because it is the spec of two code paths: the trainer's
unfused objective (medlvr/train/vlpo_step.py) and the fused lm_head objective
(medlvr/ops/fused_logprobs.py), which calls these very functions chunk by chunk.
"""
from __future__ import annotations

import torch

__all__ = ["group_advantages", "ppo_clip_loss", "kl_k3", "vlpo_loss"]

# Log-ratios are clamped before exp so one diverged latent (its Gaussian log-prob sums
# over D dimensions) cannot give inf * 0 = NaN; |log r| = 20 is far outside any clip range,
# so the clamp never changes a loss value that the clip would not already have frozen.
_MAX_LOG_RATIO = 20.0


def group_advantages(rewards: torch.Tensor, n: int, *, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of n consecutive rollouts.

    std is the population std (divide by n). A group whose rewards are all equal carries
    no learning signal and gets exactly zero advantage (not 0 / eps noise); so does n == 1.
    rewards: [G * n] -> [G * n] fp32.
    """
    if rewards.dim() != 1 or rewards.numel() % n != 0:
        raise ValueError(f"rewards: expected a 1-D tensor whose length is a multiple of n={n}, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, n)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    flat = (r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True)) == 0
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.view(-1)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, eps_low: float,
                  eps_high: float, dual_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position clipped surrogate loss (to minimise) and where the clip was active.

    r = exp(logp - old_logp);  L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)).
    Dual clip (c > 1, Ye et al. 2020): for A < 0, L = min(L, -c A), which bounds the loss
    of a position whose ratio has exploded. Shapes broadcast (advantages [R, 1] against
    log-probs [R, T]). Returns (loss, clipped) with clipped a bool tensor: the clipped or
    dual-clipped branch was taken (its gradient is zero).
    """
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    a = advantages
    loss1 = -a * ratio
    loss2 = -a * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip > 0:
        loss3 = -a * dual_clip
        dual = (a < 0) & (loss3 < loss)
        loss = torch.where(dual, loss3, loss)
        clipped = clipped | dual
    return loss, clipped


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per sampled position (Schulman 2020):
    exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased, zero iff logp == ref_logp."""
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1.0


def _position_loss(logp, old, ref, adv, *, which: str, eps_low: float, eps_high: float, dual_clip: float,
                   kl_beta: float):
    """Per-position ppo_clip_loss + kl_beta * kl_k3 for one kind of position (text tokens or
    latent steps) -> (loss, clipped mask, kl or None when kl_beta == 0)."""
    pg, clipped = ppo_clip_loss(logp, old, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    if kl_beta <= 0:
        return pg, clipped, None
    if ref is None:
        raise ValueError(f"{which}_ref: expected reference log-probs when kl_beta > 0, got None")
    kl = kl_k3(logp, ref)
    return pg + kl_beta * kl, clipped, kl


def vlpo_loss(*, token_logp: torch.Tensor, token_old: torch.Tensor, token_mask: torch.Tensor,
              latent_logp: torch.Tensor, latent_old: torch.Tensor, advantages: torch.Tensor,
              eps_low: float, eps_high: float, dual_clip: float, latent_coef: float, kl_beta: float = 0.0,
              token_ref: torch.Tensor | None = None, latent_ref: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level mean of the VLPO objective over all positions of a batch of rollouts.

    token_*: [R, T] (token_mask [R, T] marks scored tokens), latent_*: [R, K] (every latent
    position of a rollout is scored), advantages: [R]. Each position's loss is
    ppo_clip_loss + kl_beta * kl_k3; latent positions are weighted by latent_coef.
    loss = (sum_text l + latent_coef * sum_latent l) / (#text + #latent positions)
    (DAPO token-level mean; latent_coef == 0 or K == 0 drops the latent positions, count
    included).
    """
    m = token_mask.float()
    adv = advantages.float()[:, None]
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, kl_beta=kl_beta)
    t_loss, t_clip, t_kl = _position_loss(token_logp, token_old, token_ref, adv, which="token", **clip)
    use_latent = latent_coef > 0 and latent_logp.numel() > 0
    n_text = m.sum()
    n_lat = torch.tensor(float(latent_logp.numel()) if use_latent else 0.0, device=m.device)
    total = (t_loss * m).sum()
    stats = {"clip_frac_text": float((t_clip.float() * m).sum() / n_text.clamp(min=1)),
             "ratio_text": float((torch.exp(token_logp - token_old).detach() * m).sum() / n_text.clamp(min=1))}
    if t_kl is not None:
        stats["kl_text"] = float((t_kl.detach() * m).sum() / n_text.clamp(min=1))
    if use_latent:
        l_loss, l_clip, l_kl = _position_loss(latent_logp, latent_old, latent_ref, adv, which="latent", **clip)
        if l_kl is not None:
            stats["kl_latent"] = float(l_kl.detach().mean())
        total = total + latent_coef * l_loss.sum()
        stats["clip_frac_latent"] = float(l_clip.float().mean())
        stats["log_ratio_latent"] = float((latent_logp - latent_old).detach().mean())
    loss = total / (n_text + n_lat).clamp(min=1)
    stats["loss"] = float(loss.detach())
    return loss, stats
