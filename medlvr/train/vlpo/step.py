"""One VLPO step (stage 2, medlvr/train/vlpo/objective.py): rollouts, rewards, group advantages, the
KL reference's log-probs, then ``ppo_epochs`` optimizer updates of the clipped objective
(medlvr/ops/vlpo_loss.py), computed from the answer hidden states by the fused lm_head
op medlvr.ops.fused_vlpo_loss (no logits tensor, gradients in its forward, 3 GEMMs). An
lm_head the fused op cannot compute from its weight (LoRA or a quantised wrapper on it, a
replaced forward) scores through its own forward instead: medlvr.ops.lm_head_logprobs, then
the same objective from those log-probs (:func:`_loss`). The step reaches
the weights only through the training loop's :class:`medlvr.train.loop.Updater` (accelerate's
backward, clipping and autocast); called on its own with a plain optimizer it runs the same
math in plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from medlvr.models.hf import unwrap
from medlvr.ops import fused_vlpo_loss
from medlvr.ops.vlpo_loss import gaussian_kl, group_advantages, latent_scale, vlpo_loss
from medlvr.policy.head import through_head
from medlvr.policy.lora import is_peft, peft_model
from medlvr.policy.prompt import prompt_inputs, reembed
from medlvr.train.loop import Updater
from medlvr.train.vlpo.config import VLPOConfig, VLPOTokens
from medlvr.train.vlpo.rollout import (RolloutEngine, Rollouts, image_features, policy_states, sample_rollouts,
                                       state_logprobs, vision_frozen)

__all__ = ["LossInputs", "PolicyScorer", "policy_updater", "vlpo_step"]


def _reference(model, batch, ro: Rollouts, cfg: VLPOConfig, tokens: VLPOTokens, projector, vision=None):
    """The reference policy's token log-probs [R, T] and latent means [R, K, D] (None without a
    latent Gaussian) on the rollouts: what the text k3 KL and the exact latent KL compare with."""
    prompt = reembed(model, ro.prompt, batch, vision=vision)
    st = policy_states(model, ro, latent_end_id=tokens.latent_end, latent_sigma=cfg.latent_sigma, prompt=prompt,
                       projector=projector)
    tok, _ = state_logprobs(model, ro, st, temperature=cfg.temperature, latent_sigma=cfg.latent_sigma)
    return tok, st.mu


@dataclass
class LossInputs:
    """What the clipped objective compares the current policy with, fixed for one step:
    advantages [R], old log-probs (None: on-policy, the current ones detached: PPO's first
    epoch, "recompute") and the KL reference's token log-probs and latent means (None when
    kl_beta == 0)."""
    advantages: torch.Tensor
    token_old: torch.Tensor | None = None
    latent_old: torch.Tensor | None = None
    token_ref: torch.Tensor | None = None
    mu_ref: torch.Tensor | None = None


def _latent_scale(cfg: VLPOConfig, ro: Rollouts) -> float:
    return latent_scale(cfg.latent_sigma, ro.latents.shape[-1]) if cfg.latent_norm else 1.0


def _latent_coef(cfg: VLPOConfig) -> float:
    """sigma = 0 samples no latent (z_t = mu_t): there is no latent policy to optimise."""
    return cfg.latent_coef if cfg.latent_sigma > 0 else 0.0


def _loss(model, batch, ro: Rollouts, cfg: VLPOConfig, tokens: VLPOTokens, projector, vision, x: LossInputs):
    """(loss, token_logp [R,T], latent_logp [R,K], latent_kl [R,K] or None) of the policy on the
    rollouts; all but the loss detached: the decoder pass, then the clipped objective on its
    answer states and latent means.

    One objective, computed one way per lm_head (the choice: medlvr/policy/head.py). A head that
    is exactly h @ W^T + b goes through fused_vlpo_loss on its weight: the (tokens, V) logits
    never exist. Any other head's log-probs come from lm_head_logprobs (head(h), then
    log-softmax, under autograd) and the objective from vlpo_loss, the definition the fused op
    computes (medlvr/ops/vlpo_loss.py). The prompt's positions are the step's (``ro.prompt``);
    its embeddings are redone under the current weights, which carry the gradient."""
    st = policy_states(model, ro, latent_end_id=tokens.latent_end, latent_sigma=cfg.latent_sigma,
                       prompt=reembed(model, ro.prompt, batch, vision=vision), projector=projector)
    terms = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, latent_coef=_latent_coef(cfg),
                 kl_beta=cfg.kl_beta, token_ref=x.token_ref, latent_scale=_latent_scale(cfg, ro))
    use_kl = cfg.kl_beta > 0 and st.mu is not None and x.mu_ref is not None

    def fused(weight, bias, h):
        latent_old = x.latent_old
        if latent_old is None and st.mu is None:  # latent positions without a Gaussian (sigma 0): log-prob 0
            latent_old = torch.zeros(ro.latents.shape[:2], dtype=torch.float32, device=ro.latents.device)
        loss, tok, lat = fused_vlpo_loss(
            h, weight, ro.tokens, ro.token_mask, x.token_old, x.advantages, latent_old=latent_old, mu=st.mu,
            z=None if st.mu is None else ro.latents, latent_sigma=cfg.latent_sigma, temperature=cfg.temperature,
            bias=bias, mu_ref=x.mu_ref if use_kl else None, **terms)
        return loss, tok, lat, None

    def unfused(head, h):
        tok, lat = state_logprobs(model, ro, st, temperature=cfg.temperature, latent_sigma=cfg.latent_sigma)
        kl = gaussian_kl(st.mu, x.mu_ref, cfg.latent_sigma) if use_kl else None
        loss, _ = vlpo_loss(token_logp=tok, token_old=tok.detach() if x.token_old is None else x.token_old,
                            token_mask=ro.token_mask, latent_logp=lat,
                            latent_old=lat.detach() if x.latent_old is None else x.latent_old,
                            advantages=x.advantages, latent_kl=kl, **terms)
        return loss, tok.detach(), lat.detach(), None if kl is None else kl.detach()

    loss, tok, lat, kl = through_head(unwrap(model).lm_head, st.answer, fused=fused, unfused=unfused)
    if kl is None and use_kl:  # the fused op computed the KL term inside; the statistics need it too
        kl = gaussian_kl(st.mu.detach(), x.mu_ref, cfg.latent_sigma)
    return loss, tok, lat, kl


class PolicyScorer(torch.nn.Module):
    """The policy (+ projector) as one module whose forward is the VLPO loss of a batch of
    rollouts: ``forward(batch, ro, vision, inputs) -> (loss, token_logp, latent_logp, latent_kl)``.

    DDP / FSDP synchronise gradients through the wrapped module's forward; the helpers in
    ``rollout`` call inner HF modules directly, so under accelerate the gradient-carrying
    pass must go through this module's forward (stage 1's LatentLM does the same). The
    fused loss hands the lm_head's gradient to autograd in the backward, where DDP's
    gradient hooks see it like any other."""

    def __init__(self, model: torch.nn.Module, projector: torch.nn.Module | None, cfg: VLPOConfig,
                 tokens: VLPOTokens):
        super().__init__()
        self.model, self.projector, self.cfg, self.tokens = model, projector, cfg, tokens

    def forward(self, batch: Any, ro: Rollouts, vision: torch.Tensor | None, inputs: LossInputs):
        return _loss(self.model, batch, ro, self.cfg, self.tokens, self.projector, vision, inputs)


def _stats(tok, lat, kl, ro: Rollouts, cfg: VLPOConfig, x: LossInputs) -> dict[str, float]:
    """vlpo_loss's statistics (clip fractions, ratios, KL, the loss) at the detached log-probs:
    elementwise work on [R, T], the one definition of what each statistic means."""
    with torch.no_grad():
        _, stats = vlpo_loss(token_logp=tok, token_old=x.token_old, token_mask=ro.token_mask, latent_logp=lat,
                             latent_old=x.latent_old, advantages=x.advantages, eps_low=cfg.eps_low,
                             eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, latent_coef=_latent_coef(cfg),
                             kl_beta=cfg.kl_beta, token_ref=x.token_ref, latent_kl=kl,
                             latent_scale=_latent_scale(cfg, ro))
    return stats


def policy_updater(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: VLPOConfig, *,
                   tokens: VLPOTokens, projector: torch.nn.Module | None = None) -> Updater:
    """The Updater for :func:`vlpo_step` called outside the training loop: ``optimizer`` over
    the :class:`PolicyScorer` of ``model`` (and ``projector``), plain backward, clipping to
    ``cfg.loop.max_grad_norm``, no autocast."""
    return Updater(PolicyScorer(model, projector, cfg, tokens), optimizer, max_grad_norm=cfg.loop.max_grad_norm)


def vlpo_step(model: torch.nn.Module, batch: Any, reward_fn: Callable[[Rollouts], dict[str, Any]],
              updater: Updater, cfg: VLPOConfig, *, tokens: VLPOTokens,
              generator: torch.Generator | None = None, ref_model: torch.nn.Module | None = None,
              projector: torch.nn.Module | None = None, ref_projector: torch.nn.Module | None = None,
              rollout_engine: RolloutEngine | None = None) -> dict[str, float]:
    """Rollouts, rewards, advantages and ``cfg.ppo_epochs`` optimiser updates on one prompt batch.

    batch: prompts ending with <|latent_start|> (a collate Batch with with_answer=False), on
    the model's device.
    reward_fn(rollouts) -> {"reward": [R] list/tensor, other per-rollout metrics...}; rollout
    i*n + j answers prompt i. updater: the training loop's Updater (its module is the
    prepared :class:`PolicyScorer` that carries the gradient; its autocast is entered around
    the rollouts and the no-grad scoring passes, so that they run in the precision of the
    prepared forward, else the first ratio would not be 1 under mixed precision), or for a
    call outside the loop :func:`policy_updater` (plain backward, clipping, no autocast).
    ref_model: the frozen reference for full fine-tuning; None with a peft model means
    "adapter disabled". ref_projector: the reference's latent projector (a frozen copy of the
    initial one when the projector trains); default: ``projector``.
    rollout_engine: the engine reused across steps (``cfg.rollout_backend == "engine"``);
    None builds one for this step only.
    Dropout is switched off (eval mode) for the whole step: the policy that is optimised is
    the one that sampled. Old log-probs ("recompute") are the first PPO epoch's own log-probs,
    detached: the ratio of that epoch is exactly 1 without a separate no-grad pass. A frozen
    vision tower runs once per step; its features serve every pass.
    """
    if not isinstance(updater, Updater):
        raise TypeError(f"updater: expected a medlvr.train.loop.Updater (policy_updater(model, optimizer, cfg, "
                        f"tokens=...) outside the training loop), got {type(updater).__name__}")
    if cfg.kl_beta > 0 and ref_model is None and not is_peft(model):
        raise ValueError("ref_model: expected a frozen reference model for a non-peft policy when kl_beta > 0, "
                         "got None")
    amp = updater.autocast
    was_training = model.training
    model.eval()
    with torch.no_grad(), amp():
        vision = image_features(model, batch) if vision_frozen(model) else None
        # The prompt's positions and mask, once for the step (rollouts, reference, every epoch).
        prompt = prompt_inputs(model, batch, repeat=cfg.n_rollouts, vision=vision)
        ro = sample_rollouts(model, batch, cfg.rollout, latent_end_id=tokens.latent_end, stop_id=tokens.stop,
                             pad_id=tokens.pad, generator=generator, projector=projector, vision=vision,
                             prompt=prompt, engine=rollout_engine)
    rew = reward_fn(ro)
    rewards = torch.as_tensor(rew["reward"], dtype=torch.float32, device=ro.tokens.device)
    inputs = LossInputs(advantages=group_advantages(rewards, cfg.n_rollouts, eps=cfg.adv_eps))
    if cfg.kl_beta > 0:
        with torch.no_grad(), amp():
            _reference_inputs(inputs, model, ref_model, batch, ro, cfg, tokens, ref_projector or projector, vision)
    if cfg.old_logprobs == "rollout":
        inputs.token_old, inputs.latent_old = ro.token_logprobs, ro.latent_logprobs
    stats, gap = _ppo_updates(updater, batch, ro, vision, inputs, cfg)
    model.train(was_training)

    out = {k: float(torch.as_tensor(v, dtype=torch.float32).mean()) for k, v in rew.items()}
    out.update(stats)
    groups = rewards.view(-1, cfg.n_rollouts)
    out.update({
        "adv_abs": float(inputs.advantages.abs().mean()),
        "zero_std_groups": float(((groups.amax(1) - groups.amin(1)) == 0).float().mean()),
        "answer_len": float(ro.token_mask.float().sum(1).mean()),
        "stopped": float(ro.stopped.float().mean()),
        "behaviour_gap": gap,
    })
    return out


def _reference_inputs(inputs: LossInputs, model, ref_model, batch, ro: Rollouts, cfg: VLPOConfig,
                      tokens: VLPOTokens, projector, vision) -> None:
    """The KL reference's token log-probs and latent means into ``inputs``: a frozen
    ``ref_model``, or (None) the peft policy with its adapter switched off."""
    if ref_model is not None:
        ref_model.eval()
        inputs.token_ref, inputs.mu_ref = _reference(ref_model, batch, ro, cfg, tokens, projector, vision)
    else:
        with peft_model(model).disable_adapter():
            inputs.token_ref, inputs.mu_ref = _reference(model, batch, ro, cfg, tokens, projector, vision)


def _ppo_updates(updater: Updater, batch, ro: Rollouts, vision, inputs: LossInputs,
                 cfg: VLPOConfig) -> tuple[dict[str, float], float]:
    """``cfg.ppo_epochs`` optimizer updates of the clipped objective through the updater's
    module (the PolicyScorer): the last epoch's statistics and the behaviour gap (mean
    |sampler - training| text log-prob, first epoch)."""
    stats: dict[str, float] = {}
    gap = torch.zeros(())
    updater.optimizer.zero_grad(set_to_none=True)
    for epoch in range(cfg.ppo_epochs):
        # Epoch 0 with "recompute" passes no old log-probs: the policy before any update
        # scores the rollouts in this very pass, and its detached log-probs are the old ones.
        loss, tok, lat, kl = updater.module(batch, ro, vision, inputs)
        if epoch == 0:
            gap = ((tok - ro.token_logprobs).abs() * ro.token_mask).sum() / ro.token_mask.sum().clamp(min=1)
            if inputs.token_old is None:
                inputs.token_old, inputs.latent_old = tok, lat
        stats = _stats(tok, lat, kl, ro, cfg, inputs)
        updater.backward(loss)
        norm = updater.update()
        if norm is not None:
            stats["grad_norm"] = norm
    return stats, float(gap)
