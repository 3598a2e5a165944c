"""Stage 2 of MedLVR: VLPO, visual-latent policy optimisation under outcome rewards.

One step (GRPO-style, docs/vlpo.md):

1. Rollouts: n samples per prompt (``rollout.sample_rollouts``) through the latent engine
   (``medlvr.engine.LatentEngine``, built once per ``train_vlpo``; ``rollout_backend="hf"``
   selects the plain-HF loop of medlvr/engine/hf_loop.py instead, same random draws). The latent segment is
   explored by Gaussian noise on every fed-back hidden state, z_t = mu_t + sigma * eps,
   then the answer is sampled with temperature / top-p.
2. Rewards: the weighted sum of the registered rewards, by default
   ``w_accuracy * accuracy + w_format * format`` (medlvr/train/vlpo/rewards.py).
3. Advantages: normalised within each prompt's group of n (``vlpo_loss.group_advantages``).
4. Log-probs: one teacher-forced forward over [prompt; z_0..z_{K-1}; <|latent_end|>;
   answer] (``rollout.policy_states``). Text positions: log softmax(logits / T) of the
   sampled token, from the answer states and the lm_head weight without a logits tensor
   (no-grad scoring: ``medlvr.ops.lm_head_logprobs``; the training pass: step 5's fused
   op). Latent positions:
   log N(z_t; mu_t, sigma^2 I) = -||z_t - mu_t||^2 / (2 sigma^2)
   (``medlvr.ops.latent_gaussian_logprob``), mu_t = the current policy's hidden state at
   sequence index s0 + t - 1 (the position shift: mu comes from the position BEFORE the
   latent it generated).
5. Loss (``vlpo_loss.vlpo_loss``, computed by ``medlvr.ops.fused_vlpo_loss`` from the
   answer states: gradients chunk by chunk in its forward, 3 GEMMs): PPO clipped ratio with separate low / high bounds
   (clip-higher, DAPO) and a dual clip for negative advantages, plus
   beta * KL(policy || reference): k3 per text token, the exact Gaussian KL
   ||mu - mu_ref||^2 / (2 sigma^2) per latent step. Latent steps get the advantage of their
   rollout and enter at the scale sigma / sqrt(D) (a text token's; vlpo_loss.latent_scale).
   Aggregation: the mean over the step's answer tokens (DAPO's token-level mean, so a long
   answer weighs more than a short one), plus latent_coef times each rollout's mean over its
   K latent steps (K does not dilute the answer).

Reference policy: the same model with its LoRA adapter disabled while that adapter is
still at its identity init, else (full fine-tuning, or a LoRA that already holds stage-1
training) a frozen deep copy. Old log-probs ("recompute", the default) are the first PPO
epoch's own teacher-forced log-probs, detached: the first ratio is then exactly 1 and the
clipped loss's gradient is the plain policy gradient; the behaviour log-probs recorded at
sampling time (engine or KV-cached loop: different kernels) are kept for the
``behaviour_gap`` metric, or used directly with ``old_logprobs="rollout"``.

The parts: medlvr/ops/vlpo_loss.py (the pure math of 3 and 5), medlvr/train/vlpo/step.py
(the config and one step: 1 to 5 and the PPO updates), this module (the objective stage 2
plugs into the shared training loop of medlvr/train/loop.py, and ``train_vlpo``), and
medlvr/cli/vlpo.py (``medlvr vlpo``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
from typing import Any, Sequence

import torch

from medlvr.policy import LatentLM, PromptSettings, policy_tokens
from medlvr.policy.lora import adapter_is_identity, is_peft
from medlvr.policy.fsdp import gathered, is_sharded
from medlvr.train.loop import Updater, train_loop
from medlvr.train.vlpo.rewards import outcome_rewards, reward_weights
from medlvr.train.vlpo.rollout import RolloutEngine, Rollouts
from medlvr.train.vlpo.config import VLPOConfig, VLPOTokens, vlpo_loop
from medlvr.train.vlpo.step import PolicyScorer, vlpo_step

__all__ = ["VLPOConfig", "VLPOObjective", "train_vlpo", "vlpo_loop"]


def _decode(tokenizer, ro: Rollouts, stop_id: int) -> list[str]:
    texts = []
    for row, keep in zip(ro.tokens.tolist(), ro.token_mask.tolist()):
        ids = [t for t, k in zip(row, keep) if k and t != stop_id]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


class VLPOObjective:
    """Stage 2 in the shared loop (medlvr/train/loop.py): one step draws ``batch_prompts``
    records (without replacement, in a seeded order reshuffled every epoch, per process),
    collates their generation prompts and runs :func:`vlpo_step` through the loop's Updater.

    The gradient-carrying module is the :class:`PolicyScorer` (policy + projector):
    rollouts and the no-grad passes use the bare model, only the scoring pass with gradients
    runs through the prepared (DDP / FSDP) module, so gradients are synced."""
    supports_fsdp = True  # --fsdp: the reference must then be the adapter (or no KL); a copy is not sharded

    def __init__(self, model: torch.nn.Module, processor: Any, records: Sequence[Any], cfg: VLPOConfig, *,
                 projector: torch.nn.Module | None = None, reference: str = "auto", on_step: Any = None,
                 prompt: PromptSettings | None = None):
        if reference not in ("auto", "adapter", "copy"):
            raise ValueError(f"reference: expected 'auto', 'adapter' or 'copy', got {reference!r}")
        if reference == "auto":
            reference = "adapter" if adapter_is_identity(model) else "copy"
        if reference == "adapter" and not is_peft(model):
            raise ValueError("reference: 'adapter' needs a peft model, got a plain "
                             f"{type(model).__name__}")
        ids = policy_tokens(processor)
        self.latent_ids = ids.latent
        self.tokens = VLPOTokens.of(ids)
        self.model, self.projector, self.processor, self.records, self.cfg = model, projector, processor, records, cfg
        self.reference = reference
        self.on_step = on_step
        self.prompt = prompt if prompt is not None else PromptSettings()
        self.module = PolicyScorer(model, projector, cfg, self.tokens)
        self.history: list[dict] = []
        self.reward_weights = reward_weights(cfg)

    def start(self, updater: Updater) -> None:
        acc, cfg, model = updater.accelerator, self.cfg, self.model
        rank = acc.process_index if acc is not None else 0
        self.device = next(model.parameters()).device
        self.ref_model = self.ref_projector = None
        self.sharded = is_sharded(updater.module)
        if self.sharded and cfg.kl_beta > 0 and self.reference == "copy":
            raise ValueError("fsdp: VLPO's frozen-copy reference is not sharded; use a fresh LoRA (the reference "
                             "is then the adapter switched off) or --kl-beta 0")
        if cfg.kl_beta > 0:
            if self.reference == "copy":
                self.ref_model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
            if self.projector is not None:
                self.ref_projector = copy.deepcopy(self.projector).eval().requires_grad_(False)
        # Each process draws its own prompts and noise (seed + rank); every process's loss is its
        # own token mean and DDP averages the gradients, which is the global token mean when the
        # processes score equal token counts (and close to it otherwise).
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.loop.seed + rank)
        # One engine for the whole run (static cache sized at the first step, grown only if a
        # later prompt is longer); it reads the policy's modules by reference, so it rolls out
        # the weights each optimizer step leaves.
        # Sharded: the engine runs on weights FSDP gathers anew each step (new storage), which a
        # captured CUDA graph would not see.
        self.engine = (RolloutEngine(model, projector=self.projector, use_cuda_graphs=False if self.sharded else "auto")
                       if cfg.rollout_backend == "engine" else None)
        self.rng = random.Random(cfg.loop.seed + rank)
        self.order: list[int] = []

    def position(self) -> None:
        return None  # the per-process prompt order and rollout noise are not checkpointed

    def seek(self, state: dict) -> None:
        raise ValueError("VLPO runs do not resume from a checkpoint")

    def _draw(self) -> list:
        current = []
        while len(current) < self.cfg.batch_prompts:
            if not self.order:
                self.order = list(range(len(self.records)))
                self.rng.shuffle(self.order)
            current.append(self.records[self.order.pop()])
        return current

    def step(self, updater: Updater, step: int) -> dict:
        from medlvr.data.collate import collate

        cfg, tok = self.cfg, self.processor.tokenizer
        current = self._draw()

        def reward_fn(ro: Rollouts) -> dict[str, list[float]]:
            texts = _decode(tok, ro, self.tokens.stop)
            recs = [r for r in current for _ in range(ro.n)]
            return outcome_rewards(texts, ro.stopped.tolist(), recs, weights=self.reward_weights, cfg=cfg)

        batch = collate(current, self.processor, k_latent=cfg.k_latent, with_answer=False,
                        latent_token_ids=self.latent_ids, prompt=self.prompt).to(self.device)
        t0 = time.perf_counter()
        # Sharded: rollouts and no-grad scoring read the weights outside the units' forwards.
        with gathered(updater.module):
            metrics = vlpo_step(self.model, batch, reward_fn, updater, cfg, tokens=self.tokens,
                                generator=self.generator, ref_model=self.ref_model, projector=self.projector,
                                ref_projector=self.ref_projector, rollout_engine=self.engine)
        row = {"step": step, **metrics, "time_s": time.perf_counter() - t0}
        if self.on_step is not None:
            row.update(self.on_step(step, row) or {})
        self.history.append(row)
        return row

    def postfix(self, row: dict) -> dict:
        return {"reward": f"{row['reward']:.3f}", "kl": f"{row.get('kl_text', 0.0):.4f}",
                "clip": f"{row.get('clip_frac_text', 0.0):.3f}"}


def train_vlpo(model: torch.nn.Module, processor: Any, records: Sequence[Any], cfg: VLPOConfig, *,
               accelerator: Any = None, log_path: str | os.PathLike | None = None,
               projector: torch.nn.Module | None = None, reference: str = "auto", on_step: Any = None,
               prompt: PromptSettings | None = None) -> list[dict]:
    """Run ``cfg.loop.max_steps`` VLPO steps over ``records`` (medlvr.data.records.Record) in
    place, in the shared training loop with the settings ``cfg.loop`` (vlpo_step.vlpo_loop's
    defaults: AdamW at the constant lr 1e-6, clipping to max_grad_norm; its progress bar,
    autocast, device and FSDP switches), except the batch size, which is ``cfg.batch_prompts``
    (``accelerator`` default: medlvr.train.loop.make_accelerator from ``cfg.loop``).

    model: a Qwen2(.5)-VL policy, peft-wrapped (LoRA) or not (full fine-tuning), or a
    stage-1 ``LatentLM`` (its projector is then used and trained). Only parameters with
    requires_grad are optimised. projector: the stage-1 latent feedback map, trained
    too. reference: "adapter" (the policy with its peft adapter disabled: right when the
    adapter was created for this run), "copy" (a frozen deep copy of the policy as it is now:
    right for full fine-tuning and for an adapter that already holds stage-1 training), or
    "auto" (adapter when :func:`adapter_is_identity`, else copy). Returns one metrics dict per
    step, also appended as JSON lines to ``log_path`` when given (main process).
    on_step(step, row) -> dict | None, called after each step: extra metrics for that step's
    row (the demo's periodic held-out accuracy). prompt: how the prompts are written (default:
    the LatentLM's ``prompt``, else the template's system turn).
    """
    if not records:
        raise ValueError("records: expected at least one record, got none")
    if isinstance(model, LatentLM):  # the policy unit: its HF model (maybe peft-wrapped) and projector
        if projector is not None and model.projector is not None and projector is not model.projector:
            raise ValueError("projector: given both as an argument and inside the LatentLM model")
        projector = projector if projector is not None else model.projector
        prompt = prompt if prompt is not None else model.prompt
        model = model.model
    objective = VLPOObjective(model, processor, records, cfg, projector=projector, reference=reference,
                              on_step=on_step, prompt=prompt)
    loop = dataclasses.replace(cfg.loop, batch_size=cfg.batch_prompts)
    train_loop(objective, loop, accelerator=accelerator, desc="vlpo", metrics_path=log_path, append_metrics=True)
    return objective.history
