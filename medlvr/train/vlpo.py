"""Stage 2 of MedLVR: VLPO, visual-latent policy optimisation under outcome rewards.

One step (GRPO-style, docs/vlpo.md):

1. Rollouts: n samples per prompt (``rollout.sample_rollouts``) through the latent engine
   (``medlvr.engine.LatentEngine``, built once per ``train_vlpo``; ``rollout_backend="hf"``
   selects the plain-HF loop of medlvr/reference/latent_loop.py instead, same random draws). The latent segment is
   explored by Gaussian noise on every fed-back hidden state, z_t = mu_t + sigma * eps,
   then the answer is sampled with temperature / top-p.
2. Rewards: ``w_acc * accuracy + w_fmt * format`` (``rewards.outcome_rewards``).
3. Advantages: normalised within each prompt's group of n (:func:`group_advantages`).
4. Log-probs: one teacher-forced forward over [prompt; z_0..z_{K-1}; <|latent_end|>;
   answer] (``rollout.policy_forward``). Text positions: log softmax(logits / T) of the
   sampled token (``medlvr.ops.gather_logprobs``). Latent positions:
   log N(z_t; mu_t, sigma^2 I) = -||z_t - mu_t||^2 / (2 sigma^2)
   (``medlvr.ops.latent_gaussian_logprob``), mu_t = the current policy's hidden state at
   sequence index s0 + t - 1 (the position shift: mu comes from the position BEFORE the
   latent it generated).
5. Loss (:func:`vlpo_loss`): PPO clipped ratio with separate low / high bounds
   (clip-higher, DAPO) and a dual clip for negative advantages, plus
   beta * KL(policy || reference) by the k3 estimator, per position; latent positions get
   the same advantage as the text of their rollout and weight ``latent_coef``.
   Aggregation is the DAPO token-level mean: the sum over every scored position of the
   step's rollouts divided by their count, so a long answer weighs more than a short one
   (GRPO's per-sample mean would up-weight the tokens of short answers).

Reference policy: the same model with its LoRA adapter disabled while that adapter is
still at its identity init, else (full fine-tuning, or a LoRA that already holds stage-1
training) a frozen deep copy. Old log-probs ("recompute", the default) are the first PPO
epoch's own teacher-forced log-probs, detached: the first ratio is then exactly 1 and the
clipped loss's gradient is the plain policy gradient; the behaviour log-probs recorded at
sampling time (engine or KV-cached loop: different kernels) are kept for the
``behaviour_gap`` metric, or used directly with ``old_logprobs="rollout"``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from medlvr.train.rewards import outcome_rewards
from medlvr.train.rollout import (BACKENDS, RolloutEngine, Rollouts, image_features, policy_forward, prompt_inputs,
                                  sample_rollouts, vision_frozen)

__all__ = [
    "VLPOConfig", "VLPOTokens", "PolicyScorer", "adapter_is_identity", "group_advantages", "ppo_clip_loss", "kl_k3", "vlpo_loss", "vlpo_step",
    "train_vlpo", "add_vlpo_arguments", "vlpo_main",
]

# Log-ratios are clamped before exp so one diverged latent (its Gaussian log-prob sums
# over D dimensions) cannot give inf * 0 = NaN; |log r| = 20 is far outside any clip range,
# so the clamp never changes a loss value that the clip would not already have frozen.
_MAX_LOG_RATIO = 20.0


@dataclass
class VLPOConfig:
    """Hyper-parameters of stage 2. Defaults follow GRPO / DAPO practice."""
    n_rollouts: int = 4           # samples per prompt (the group)
    temperature: float = 1.0      # text sampling temperature (also used in the log-probs)
    top_p: float = 1.0            # nucleus for text sampling
    latent_sigma: float = 0.1     # std of the latent exploration noise (0: no latent term)
    k_latent: int = 8             # latent steps per rollout (fixed exit during VLPO)
    eps_low: float = 0.2          # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28        # ... and above at 1 + eps_high (clip-higher)
    dual_clip: float = 3.0        # c > 1: loss of a negative-advantage position is at most -c * A; 0 = off
    kl_beta: float = 0.04         # weight of the k3 KL to the reference policy; 0 = no reference pass
    latent_coef: float = 0.1      # weight of a latent position relative to a text token
    lr: float = 1e-6
    steps: int = 100
    batch_prompts: int = 4        # prompts per step (rollouts per step = batch_prompts * n_rollouts)
    max_new_tokens: int = 32
    w_accuracy: float = 1.0
    w_format: float = 0.1
    seed: int = 0
    ppo_epochs: int = 1           # optimiser steps per batch of rollouts
    adv_eps: float = 1e-6         # A = (r - mean) / (std + adv_eps)
    max_grad_norm: float = 1.0    # 0 = no clipping
    old_logprobs: str = "recompute"  # "recompute" (teacher-forced, exact on-policy) | "rollout"
    rollout_backend: str = "engine"  # "engine" (LatentEngine) | "hf" (plain HF KV-cached loop, the fallback)

    def validate(self) -> None:
        checks = [
            ("n_rollouts", self.n_rollouts >= 1, ">= 1"), ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("latent_sigma", self.latent_sigma >= 0, ">= 0"),
            ("k_latent", self.k_latent >= 0, ">= 0"), ("eps_low", 0 <= self.eps_low < 1, "in [0, 1)"),
            ("eps_high", self.eps_high >= 0, ">= 0"),
            ("dual_clip", self.dual_clip == 0 or self.dual_clip > 1, "0 (off) or > 1"),
            ("kl_beta", self.kl_beta >= 0, ">= 0"), ("latent_coef", self.latent_coef >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"), ("steps", self.steps >= 0, ">= 0"),
            ("batch_prompts", self.batch_prompts >= 1, ">= 1"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"), ("adv_eps", self.adv_eps >= 0, ">= 0"),
            ("old_logprobs", self.old_logprobs in ("recompute", "rollout"), "'recompute' or 'rollout'"),
            ("rollout_backend", self.rollout_backend in BACKENDS, " or ".join(map(repr, BACKENDS))),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"VLPOConfig.{name}: expected {want}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class VLPOTokens:
    """Token ids the rollout loop needs: <|latent_end|>, the stop token (<|im_end|>), pad."""
    latent_end: int
    stop: int
    pad: int


# ------------------------------------------------------------------ pure functions ---
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


# ------------------------------------------------------------------------- a step ---
def _is_peft(model: torch.nn.Module) -> bool:
    m = model
    while hasattr(m, "module") and not hasattr(m, "disable_adapter"):
        m = m.module
    return hasattr(m, "disable_adapter") and hasattr(m, "get_base_model")


def _peft(model: torch.nn.Module) -> torch.nn.Module:
    m = model
    while not hasattr(m, "disable_adapter"):
        m = m.module
    return m


def adapter_is_identity(model: torch.nn.Module) -> bool:
    """True when a peft LoRA model's adapter is still at peft's identity init (every lora_B
    zero, trainable-token rows equal to the base rows): disabling it then gives the very same
    policy, so it is a valid KL reference. False for any adapter that has been trained, any
    other peft type, or a plain model."""
    if not _is_peft(model):
        return False
    m = _peft(model)
    types = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in getattr(m, "peft_config", {}).values()}
    if not types or not types <= {"LORA"}:
        return False
    for mod in m.modules():
        for name in ("lora_B", "lora_embedding_B"):
            d = getattr(mod, name, None)
            if isinstance(d, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
                for v in d.values():
                    w = v.weight if isinstance(v, torch.nn.Module) else v
                    if bool((w != 0).any()):
                        return False
        delta = getattr(mod, "trainable_tokens_delta", None)
        if isinstance(delta, torch.nn.ParameterDict) and len(delta):
            base = mod.get_base_layer().weight.detach()
            for k, v in delta.items():
                idx = torch.as_tensor(mod.token_indices[k], device=base.device)
                if not torch.equal(v.detach(), base[idx].to(v.dtype)):
                    return False
    return True


def _score(model, batch, ro: Rollouts, cfg: VLPOConfig, tokens: VLPOTokens, projector, vision=None):
    prompt = prompt_inputs(model, batch, repeat=ro.n, vision=vision)
    return policy_forward(model, ro, latent_end_id=tokens.latent_end, temperature=cfg.temperature,
                          latent_sigma=cfg.latent_sigma, prompt=prompt, projector=projector)


class PolicyScorer(torch.nn.Module):
    """The policy (+ projector) as one module whose forward is the teacher-forced scoring.

    DDP / FSDP synchronise gradients through the wrapped module's forward; the helpers in
    ``rollout`` call inner HF modules directly, so under accelerate the gradient-carrying
    pass must go through this module's forward (stage 1's LatentLM does the same)."""

    def __init__(self, model: torch.nn.Module, projector: torch.nn.Module | None, cfg: VLPOConfig,
                 tokens: VLPOTokens):
        super().__init__()
        self.model, self.projector, self.cfg, self.tokens = model, projector, cfg, tokens

    def forward(self, batch: Any, ro: Rollouts, vision: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return _score(self.model, batch, ro, self.cfg, self.tokens, self.projector, vision)


def vlpo_step(model: torch.nn.Module, batch: Any, reward_fn: Callable[[Rollouts], dict[str, Any]],
              optimizer: torch.optim.Optimizer, cfg: VLPOConfig, *, tokens: VLPOTokens,
              generator: torch.Generator | None = None, ref_model: torch.nn.Module | None = None,
              projector: torch.nn.Module | None = None, ref_projector: torch.nn.Module | None = None,
              backward: Callable[[torch.Tensor], None] | None = None,
              clip_grad: Callable[[Sequence[torch.nn.Parameter], float], Any] | None = None,
              scorer: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
              rollout_engine: RolloutEngine | None = None) -> dict[str, float]:
    """Rollouts, rewards, advantages and ``cfg.ppo_epochs`` optimiser steps on one prompt batch.

    batch: left-padded prompts ending with <|latent_start|> (collate with_answer=False),
    on the model's device. reward_fn(rollouts) -> {"reward": [R] list/tensor, other
    per-rollout metrics...}; rollout i*n + j answers prompt i. ref_model: the frozen
    reference for full fine-tuning; None with a peft model means "adapter disabled".
    ref_projector: the reference's latent projector (a frozen copy of the initial one when
    the projector trains); default: ``projector``.
    scorer: the gradient-carrying scoring pass (a DDP-wrapped :class:`PolicyScorer` under
    accelerate); default: the same teacher-forced forward called directly.
    autocast: a context factory (``accelerator.autocast``) entered around the rollouts and
    the no-grad scoring passes, so that they run in the precision the prepared scorer's
    forward runs in (else the first ratio would not be 1 under mixed precision).
    rollout_engine: the engine reused across steps (``cfg.rollout_backend == "engine"``);
    None builds one for this step only.
    Dropout is switched off (eval mode) for the whole step: the policy that is optimised is
    the one that sampled. Old log-probs ("recompute") are the first PPO epoch's own log-probs,
    detached: the ratio of that epoch is exactly 1 without a separate no-grad pass. A frozen
    vision tower runs once per step; its features serve every pass.
    """
    if cfg.kl_beta > 0 and ref_model is None and not _is_peft(model):
        raise ValueError("ref_model: expected a frozen reference model for a non-peft policy when kl_beta > 0, "
                         "got None")
    amp = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    n = cfg.n_rollouts
    with torch.no_grad(), amp():
        vision = image_features(model, batch) if vision_frozen(model) else None
        ro = sample_rollouts(model, batch, n=n, k_latent=cfg.k_latent, latent_sigma=cfg.latent_sigma,
                             temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             latent_end_id=tokens.latent_end, stop_id=tokens.stop, pad_id=tokens.pad,
                             generator=generator, projector=projector, vision=vision,
                             backend=cfg.rollout_backend, engine=rollout_engine)
    rew = reward_fn(ro)
    rewards = torch.as_tensor(rew["reward"], dtype=torch.float32, device=ro.tokens.device)
    adv = group_advantages(rewards, n, eps=cfg.adv_eps)

    ref_tok = ref_lat = None
    if cfg.kl_beta > 0:
        with torch.no_grad(), amp():
            if ref_model is not None:
                ref_model.eval()
                ref_tok, ref_lat = _score(ref_model, batch, ro, cfg, tokens, ref_projector or projector, vision)
            else:
                with _peft(model).disable_adapter():
                    ref_tok, ref_lat = _score(model, batch, ro, cfg, tokens, ref_projector or projector, vision)

    old_tok = old_lat = None
    if cfg.old_logprobs == "rollout":
        old_tok, old_lat = ro.token_logprobs, ro.latent_logprobs
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stats: dict[str, float] = {}
    gap = torch.zeros(())
    for epoch in range(cfg.ppo_epochs):
        if scorer is not None:
            tok, lat = scorer(batch, ro, vision)
        else:
            tok, lat = _score(model, batch, ro, cfg, tokens, projector, vision)
        if epoch == 0:
            # The policy before any update scored the rollouts: these are the old log-probs.
            first = tok.detach()
            gap = ((first - ro.token_logprobs).abs() * ro.token_mask).sum() / ro.token_mask.sum().clamp(min=1)
            if old_tok is None:
                old_tok, old_lat = first, lat.detach()
        loss, stats = vlpo_loss(token_logp=tok, token_old=old_tok, token_mask=ro.token_mask, latent_logp=lat,
                                latent_old=old_lat, advantages=adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                dual_clip=cfg.dual_clip, latent_coef=cfg.latent_coef, kl_beta=cfg.kl_beta,
                                token_ref=ref_tok, latent_ref=ref_lat)
        optimizer.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(loss)
        if cfg.max_grad_norm > 0:
            norm = (clip_grad or torch.nn.utils.clip_grad_norm_)(params, cfg.max_grad_norm)
            stats["grad_norm"] = float(norm)
        optimizer.step()
    model.train(was_training)

    out = {k: float(torch.as_tensor(v, dtype=torch.float32).mean()) for k, v in rew.items()}
    out.update(stats)
    groups = rewards.view(-1, n)
    out.update({
        "adv_abs": float(adv.abs().mean()),
        "zero_std_groups": float(((groups.amax(1) - groups.amin(1)) == 0).float().mean()),
        "answer_len": float(ro.token_mask.float().sum(1).mean()),
        "stopped": float(ro.stopped.float().mean()),
        "behaviour_gap": float(gap),
    })
    return out


# ------------------------------------------------------------------ training loop ---
def _to_device(batch: Any, device: torch.device) -> dict[str, Any]:
    names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    out = {}
    for k in names:
        v = batch[k] if isinstance(batch, dict) else getattr(batch, k, None)
        out[k] = v.to(device) if isinstance(v, torch.Tensor) else v
    return out


def _decode(tokenizer, ro: Rollouts, stop_id: int) -> list[str]:
    texts = []
    for row, keep in zip(ro.tokens.tolist(), ro.token_mask.tolist()):
        ids = [t for t, k in zip(row, keep) if k and t != stop_id]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def train_vlpo(model: torch.nn.Module, processor: Any, records: Sequence[Any], cfg: VLPOConfig, *,
               accelerator: Any = None, progress: bool = True, log_path: str | os.PathLike | None = None,
               projector: torch.nn.Module | None = None, reference: str = "auto") -> list[dict]:
    """Run ``cfg.steps`` VLPO steps over ``records`` (medlvr.train.data.Record) in place.

    model: a Qwen2(.5)-VL policy, peft-wrapped (LoRA) or not (full fine-tuning), or a
    stage-1 ``LatentLM`` (its projector is then used and trained). Only parameters with
    requires_grad are optimised (AdamW). projector: the stage-1 latent feedback map, trained
    too. reference: "adapter" (the policy with its peft adapter disabled: right when the
    adapter was created for this run), "copy" (a frozen deep copy of the policy as it is now:
    right for full fine-tuning and for an adapter that already holds stage-1 training), or
    "auto" (adapter when :func:`adapter_is_identity`, else copy). Records are drawn without replacement in a seeded
    order, reshuffled every epoch. Returns one metrics dict per step, also appended as
    JSON lines to ``log_path`` when given.
    """
    from medlvr.models import latent_token_ids
    from medlvr.train.collate import collate

    cfg.validate()
    if not records:
        raise ValueError("records: expected at least one record, got none")
    if hasattr(model, "projector") and hasattr(model, "model") and not hasattr(model, "lm_head"):
        # a stage-1 LatentLM (HF model, maybe peft-wrapped, + optional projector)
        if projector is not None and model.projector is not None and projector is not model.projector:
            raise ValueError("projector: given both as an argument and inside the LatentLM model")
        projector = projector if projector is not None else model.projector
        model = model.model
    tok = processor.tokenizer
    lt = latent_token_ids(processor)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop
    tokens = VLPOTokens(latent_end=lt.end, stop=stop, pad=pad)

    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if projector is not None:
        params += [p for p in projector.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected trainable parameters (requires_grad), found none")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    backward = clip_grad = scorer = autocast = None
    rank = 0
    if accelerator is not None:
        # Rollouts and the no-grad passes use the bare model; only the scoring pass with
        # gradients runs through the prepared (DDP / FSDP) module, so gradients are synced.
        scorer, optimizer = accelerator.prepare(PolicyScorer(model, projector, cfg, tokens), optimizer)
        backward, clip_grad = accelerator.backward, accelerator.clip_grad_norm_
        autocast = accelerator.autocast
        rank = accelerator.process_index
    device = next(model.parameters()).device
    if reference not in ("auto", "adapter", "copy"):
        raise ValueError(f"reference: expected 'auto', 'adapter' or 'copy', got {reference!r}")
    if reference == "auto":
        reference = "adapter" if adapter_is_identity(model) else "copy"
    if reference == "adapter" and not _is_peft(model):
        raise ValueError("reference: 'adapter' needs a peft model, got a plain "
                         f"{type(model).__name__}")
    ref_model = ref_projector = None
    if cfg.kl_beta > 0:
        if reference == "copy":
            ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        if projector is not None:
            ref_projector = copy.deepcopy(projector).eval().requires_grad_(False)
    # Each process draws its own prompts and noise (seed + rank); every process's loss is its
    # own token mean and DDP averages the gradients, which is the global token mean when the
    # processes score equal token counts (and close to it otherwise).
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    # One engine for the whole run (static cache sized at the first step, grown only if a
    # later prompt is longer); it reads the policy's modules by reference, so it rolls out
    # the weights each optimizer step leaves.
    rollout_engine = RolloutEngine(model, projector=projector) if cfg.rollout_backend == "engine" else None
    rng = random.Random(cfg.seed + rank)
    main = accelerator is None or accelerator.is_main_process

    def reward_fn(ro: Rollouts) -> dict[str, list[float]]:
        texts = _decode(tok, ro, stop)
        recs = [r for r in current for _ in range(ro.n)]
        return outcome_rewards(texts, ro.stopped.tolist(), recs, w_accuracy=cfg.w_accuracy, w_format=cfg.w_format)

    order: list[int] = []
    history: list[dict] = []
    log = open(log_path, "a") if (log_path and main) else None
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="vlpo", dynamic_ncols=True)
    try:
        for step in range(cfg.steps):
            current = []
            while len(current) < cfg.batch_prompts:
                if not order:
                    order = list(range(len(records)))
                    rng.shuffle(order)
                current.append(records[order.pop()])
            batch = collate(current, processor, k_latent=cfg.k_latent, with_answer=False,
                            latent_token_ids=lt, padding_side="left")
            t0 = time.perf_counter()
            metrics = vlpo_step(model, _to_device(batch, device), reward_fn, optimizer, cfg, tokens=tokens,
                                generator=gen, ref_model=ref_model, projector=projector,
                                ref_projector=ref_projector, backward=backward,
                                clip_grad=clip_grad, scorer=scorer, autocast=autocast,
                                rollout_engine=rollout_engine)
            metrics = {"step": step, **metrics, "time_s": time.perf_counter() - t0}
            history.append(metrics)
            if log is not None:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl_text', 0.0):.4f}",
                                clip=f"{metrics.get('clip_frac_text', 0.0):.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return history


# --------------------------------------------------------------------------- CLI ---
def add_vlpo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``medlvr vlpo`` (one per VLPOConfig field, plus model / data / output)."""
    from medlvr.train.loop import MIXED_PRECISION

    d = VLPOConfig()
    p.add_argument("--data", required=True, help="training JSONL (medlvr format)")
    p.add_argument("--split", default="train", help="records of this split are used (others ignored)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--model", default="default",
                   help="'default' (embedded small Qwen2.5-VL) or a local checkpoint dir; ignored with --init")
    p.add_argument("--init", default=None,
                   help="a stage-1 run directory (run.json + model.safetensors, e.g. runs/sft/final): "
                        "its base model, LoRA, projector and K are restored and trained further")
    p.add_argument("--lora", action="store_true", help="without --init: LoRA (q/k/v/o) instead of full fine-tuning")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--out", default="runs/vlpo", help="output dir: metrics.jsonl, vlpo.json, final/")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                   help="autocast of the training passes: auto = bf16 on a GPU, none on the CPU (rollouts "
                        "run in the weights' dtype)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("VLPO")
    g.add_argument("--k-latent", type=int, default=None,
                   help=f"latent steps K (default: the --init run's K, else {d.k_latent})")
    for f in dataclasses.fields(VLPOConfig):
        if f.name == "k_latent":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        g.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    return p


def _save(out: Any, lm: torch.nn.Module, run_meta: dict) -> None:
    import shutil

    from safetensors.torch import save_file

    final = out / "final"
    tmp = out / ".tmp-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(lm.trainable_state_dict(), str(tmp / "model.safetensors"))
    (tmp / "run.json").write_text(json.dumps(run_meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # a crash never leaves a half-written final/


def vlpo_main(args: argparse.Namespace) -> dict:
    """``medlvr vlpo``: load (model from --model or the stage-1 run --init), data, train, save.

    Output (<out>): metrics.jsonl (one line per step), vlpo.json (the config), final/
    (run.json + model.safetensors in the stage-1 format, so ``stage1.load_trained`` and the
    evaluation read a VLPO result like a stage-1 one). Returns the last step's metrics plus
    ``final_dir``.
    """
    from pathlib import Path

    from medlvr.models import load
    from medlvr.train.data import load_split
    from medlvr.train.loop import make_accelerator
    from medlvr.train.stage1 import Stage1Config, build_trainable, load_trained

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    records = load_split(args.data, args.split, skip_bad=args.skip_bad, window=getattr(args, "window", None))

    if args.init:
        lm, processor, meta = load_trained(args.init, device=device, dtype=dtype)
        base = meta["base"]
        k_default = int(meta["stage1"]["k_latent"])
        stage1 = meta["stage1"]
    else:
        model, processor = load(args.model, dtype=dtype, device=device, seed=args.seed)
        k_default = VLPOConfig().k_latent if args.k_latent is None else args.k_latent
        s1 = Stage1Config(k_latent=k_default, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha)
        lm = build_trainable(model, processor, s1).to(device)
        base, stage1 = args.model, dataclasses.asdict(s1)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(VLPOConfig) if f.name != "k_latent"}
    cfg = VLPOConfig(k_latent=k_default if args.k_latent is None else args.k_latent, **fields)
    cfg.validate()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlpo.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # one run per directory: metrics of an older run are not mixed in
    # "auto": a stage-1 LoRA already holds the SFT policy (disabling it would give the base
    # model), so the KL reference is then a frozen copy; a fresh adapter is simply disabled.
    history = train_vlpo(lm, processor, records, cfg, progress=not args.no_progress, log_path=metrics_path,
                         reference="auto", accelerator=make_accelerator(args.mixed_precision))
    stage1 = {**stage1, "k_latent": cfg.k_latent}
    _save(out, lm, {"base": base, "stage1": stage1, "vlpo": dataclasses.asdict(cfg), "init": args.init})
    last = dict(history[-1]) if history else {}
    last["final_dir"] = str(out / "final")
    return last
