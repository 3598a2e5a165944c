"""The latent policy: the unit both stages train, VLPO rolls out and evaluation decodes.

``LatentLM`` is the HF model (maybe peft-wrapped) plus the optional latent feedback projector.
Its forward is the policy's teacher-forced pass over a collated batch (medlvr/policy/batch.py's
layout), in one of the two forms of medlvr/policy/latent.py:

- recurrent (default): the exact latent recurrence, each latent the fed-back hidden state;
- latents given: ``teacher(vision_tokens, batch) -> [B, K, D]`` supplies the K latent inputs
  (stage 1's LVR-style teacher forcing feeds the pooled ROI targets, medlvr/train/sft/roi.py).

It returns the answer cross-entropy in its training form (the fused op's gradient-carrying
mean) and the latent states; the losses built on them are the training objectives'
(medlvr/train/sft/, medlvr/train/vlpo/). DDP / FSDP wrap this module, so every parameter the
loss needs is used inside this forward.

The builder (:func:`build_trainable`) makes full fine-tuning or LoRA (peft, medlvr/policy/lora.py)
on the family's attention projections plus the rows of the new latent tokens;
:func:`load_trained` rebuilds one from a run folder (medlvr/policy/run_dir.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from medlvr.flags import opt
from medlvr.models.hf import hidden_size, unwrap, vision_tokens
from medlvr.policy import families
from medlvr.policy.batch import Batch
from medlvr.policy.latent import LatentOutput, LatentProjector, forward_with_latents, recurrent_forward
from medlvr.policy.lora import add_lora
from medlvr.policy.prompt import PromptSettings, recorded
from medlvr.policy.run_dir import RunDir, trainable_state

__all__ = ["PolicyConfig", "LatentLM", "build_trainable", "load_trained"]

Teacher = Callable[[torch.Tensor | None, Batch], torch.Tensor]


@dataclass
class PolicyConfig:
    """The shape of the trainable policy; each field's metadata makes its flag (medlvr/flags.py).
    Stage 1's config (medlvr/train/sft/config.py) extends it with the objective's settings, so
    run.json's "stage1" holds both and :func:`load_trained` reads these fields from it."""
    k_latent: int = opt(4, "latent steps K (0 = plain SFT)")
    projector: bool = opt(False, "learned latent feedback projector (identity at init)")
    lora: bool = opt(False, "LoRA on q/k/v/o of the language model (else full fine-tuning)")
    lora_r: int = opt(16, "LoRA rank, with --lora (default 16)")
    lora_alpha: int = opt(32, "LoRA alpha (scale alpha/r), with --lora (default 32)")
    lora_dropout: float = opt(0.0, None)  # no flag: the command line trains LoRA without dropout

    def __post_init__(self):
        if isinstance(self.k_latent, bool) or not isinstance(self.k_latent, int) or self.k_latent < 0:
            raise ValueError(f"k_latent: expected an int >= 0, got {self.k_latent!r}")

    @classmethod
    def from_meta(cls, stage1: dict) -> "PolicyConfig":
        """The policy's fields of a run.json "stage1" object (which may hold more)."""
        names = {f.name for f in dataclasses.fields(PolicyConfig)}
        return PolicyConfig(**{k: v for k, v in stage1.items() if k in names})


class LatentLM(nn.Module):
    """HF model (maybe peft-wrapped) + optional latent projector; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: PolicyConfig, *, prompt: PromptSettings | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.projector = LatentProjector(hidden_size(model)) if cfg.projector else None
        # How the policy's prompts are written (the system turn, the image bound): recorded in
        # every run folder it is saved to, and used by every command that reads it back.
        self.prompt = prompt if prompt is not None else PromptSettings()

    @property
    def base(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def k_latent(self) -> int:
        return self.cfg.k_latent

    def forward(self, batch: Batch, *, teacher: Teacher | None = None) -> LatentOutput:
        """The training pass: answer CE (``ce_mean`` carries the gradient) and latent states."""
        k = self.cfg.k_latent
        if k == 0:
            return forward_with_latents(self.model, batch, None, k=0, ce_mean=True)
        if teacher is None:
            return recurrent_forward(self.model, batch, k=k, projector=self.projector, ce_mean=True)
        vis = vision_tokens(self.model, batch.pixel_values, batch.image_grid_thw)
        return forward_with_latents(self.model, batch, teacher(vis, batch), k=k, vis=vis, ce_mean=True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self)


def build_trainable(model: nn.Module, processor: Any, cfg: PolicyConfig, *,
                    prompt: PromptSettings | None = None) -> LatentLM:
    """Wrap the HF model for training: LoRA (peft) or full fine-tuning, then the LatentLM module.
    prompt: its prompt settings (default: the template's system turn), resolved against the
    processor's image bound."""
    from medlvr.models import latent_token_ids

    if cfg.lora:
        ids = latent_token_ids(processor)
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=families.of_model(model).LORA_TARGETS,
                         trainable_tokens=[ids.start, ids.end, ids.pad])
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return LatentLM(model, cfg, prompt=(prompt or PromptSettings()).resolved(processor))


def load_trained(run_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 prompt: PromptSettings | None = None):
    """(LatentLM, processor, meta) from a run folder (a finished run's ``final/`` or any
    checkpoint): the base model rebuilt from run.json, LoRA / projector as its policy config
    says, then the saved weights; in eval mode on ``device``. The prompt settings are the run's
    (run.json's "prompt"), with the fields ``prompt`` sets taking precedence; ``lm.prompt``
    holds what applies."""
    from medlvr.models import load

    run = RunDir(Path(run_dir))
    meta = run.meta()
    # The embedded base is built from a seed: the run's (stage 1 builds it from --seed). A
    # LoRA run's weights are deltas on that base, so another seed is another model.
    seed = int(meta.get("base_seed", meta.get("loop", {}).get("seed", 0)))
    settings = PromptSettings.from_meta(meta)
    if prompt is not None:
        settings = prompt.over(settings)
    model, processor = load(meta["base"], dtype=dtype, device=device, seed=seed, min_pixels=settings.min_pixels,
                            max_pixels=settings.max_pixels, cap_max_pixels=recorded(meta))
    lm = build_trainable(model, processor, PolicyConfig.from_meta(meta["stage1"]), prompt=settings)
    run.load_weights(lm)
    lm.to(device)
    lm.eval()
    return lm, processor, meta
