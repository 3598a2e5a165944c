"""Stage 2's settings: VLPOConfig (checked once, where it is made), its training-loop defaults
and the token ids a VLPO step needs."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from medlvr.data.scoring import protocol_names
from medlvr.flags import nested, opt
from medlvr.policy import PolicyTokens
from medlvr.train.loop import LoopConfig
from medlvr.train.vlpo.rollout import BACKENDS, RolloutSettings

__all__ = ["VLPOConfig", "VLPOTokens", "vlpo_loop", "VLPO_LOOP_FLAGS"]


def vlpo_loop(**settings: Any) -> LoopConfig:
    """Stage 2's training-loop settings: a LoopConfig with VLPO's defaults (lr 1e-6, held
    constant, output runs/vlpo; GRPO / DAPO practice) and ``settings`` over them."""
    return LoopConfig(**{"out_dir": "runs/vlpo", "lr": 1e-6, "schedule": "constant", **settings})


# The loop settings ``medlvr vlpo`` takes as flags; the others keep vlpo_loop's value
# (batch_size among them: VLPO's batch is batch_prompts per process, which train_vlpo hands
# the loop). LoopConfig checks them all, so --steps is >= 1: a VLPO run makes at least one step.
VLPO_LOOP_FLAGS = ("out_dir", "max_steps", "lr", "seed", "max_grad_norm", "mixed_precision", "device", "fsdp",
                   "progress")


@dataclass
class VLPOConfig:
    """Hyper-parameters of stage 2. Defaults follow GRPO / DAPO practice. Each field's
    metadata holds its help text and choices: ``medlvr vlpo`` makes its flags from them.
    ``loop`` holds the shared loop's settings (steps, lr, seed, clipping, device, ...: one
    definition, medlvr/train/loop.py); vlpo.json and run.json show it as a nested object."""
    n_rollouts: int = opt(4, "samples per prompt (the group)")
    temperature: float = opt(1.0, "text sampling temperature (also used in the log-probs)")
    top_p: float = opt(1.0, "nucleus for text sampling")
    latent_sigma: float = opt(0.1, "std of the latent exploration noise (0: no latent term)")
    k_latent: int = opt(8, "latent steps per rollout (fixed exit during VLPO)")
    eps_low: float = opt(0.2, "ratio clipped below at 1 - eps_low")
    eps_high: float = opt(0.28, "ratio clipped above at 1 + eps_high (clip-higher)")
    dual_clip: float = opt(3.0, "c > 1: the loss of a negative-advantage position is at most -c * A; 0 = off")
    kl_beta: float = opt(0.04, "weight of the KL to the reference policy; 0 = no reference pass")
    latent_coef: float = opt(0.1, "weight of a rollout's whole latent segment, in answer tokens")
    latent_norm: bool = opt(True, "latent log-probs scaled by sigma / sqrt(D) (vlpo_loss.latent_scale)")
    batch_prompts: int = opt(4, "prompts per step (rollouts per step = batch_prompts * n_rollouts)")
    max_new_tokens: int = opt(32, "answer tokens sampled per rollout at most")
    w_accuracy: float = opt(1.0, "reward weight of a correct answer")
    w_format: float = opt(0.1, "reward weight of a well-formed answer")
    reward_protocol: str = opt("medlvr", "scoring protocol of the accuracy reward (medlvr/data/scoring/; a strict one: "
                                         "the benchmark toolkits' multiple-choice rules reward non-answers)",
                               choices=tuple(protocol_names()))
    ppo_epochs: int = opt(1, "optimiser steps per batch of rollouts")
    adv_eps: float = opt(1e-6, "A = (r - mean) / (std + adv_eps)")
    old_logprobs: str = opt("recompute", "recompute = teacher-forced, exact on-policy; rollout = the sampler's",
                            choices=("recompute", "rollout"))
    rollout_backend: str = opt("engine", "engine = LatentEngine (grouped rows); hf = the plain HF KV-cached loop",
                               choices=BACKENDS)
    loop: LoopConfig = nested(vlpo_loop, VLPO_LOOP_FLAGS)

    def __post_init__(self):
        self.validate()

    @functools.cached_property
    def rollout(self) -> RolloutSettings:
        """The rollout settings of this config, made (and checked) once."""
        return RolloutSettings(n=self.n_rollouts, k_latent=self.k_latent, latent_sigma=self.latent_sigma,
                               temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                               backend=self.rollout_backend)

    def validate(self) -> None:
        """The checks, run where the config is made (also by ``dataclasses.replace``)."""
        checks = [
            ("n_rollouts", self.n_rollouts >= 1, ">= 1"), ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("latent_sigma", self.latent_sigma >= 0, ">= 0"),
            ("k_latent", self.k_latent >= 0, ">= 0"), ("eps_low", 0 <= self.eps_low < 1, "in [0, 1)"),
            ("eps_high", self.eps_high >= 0, ">= 0"),
            ("dual_clip", self.dual_clip == 0 or self.dual_clip > 1, "0 (off) or > 1"),
            ("kl_beta", self.kl_beta >= 0, ">= 0"), ("latent_coef", self.latent_coef >= 0, ">= 0"),
            ("batch_prompts", self.batch_prompts >= 1, ">= 1"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"), ("adv_eps", self.adv_eps >= 0, ">= 0"),
            ("old_logprobs", self.old_logprobs in ("recompute", "rollout"), "'recompute' or 'rollout'"),
            ("rollout_backend", self.rollout_backend in BACKENDS, " or ".join(map(repr, BACKENDS))),
            ("loop", isinstance(self.loop, LoopConfig), "a LoopConfig (vlpo_loop(...))"),
            ("latent_norm", isinstance(self.latent_norm, bool), "True or False"),
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

    @classmethod
    def of(cls, tokens: PolicyTokens) -> "VLPOTokens":
        return cls(latent_end=tokens.latent.end, stop=tokens.stop, pad=tokens.pad)
