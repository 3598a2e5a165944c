"""Stage 1 of MedLVR: ROI-supervised latent fine-tuning (``medlvr sft``).

Loss of one batch of B samples (per-sample means keep it linear in samples, so DDP over equal
per-process shards equals one process on the global batch, and partial ROI annotation just
zeroes a sample's second term):

    loss = 1/B · Σ_b [ CE_b(answer tokens) + λ · ROI_b ]
    ROI_b = mean over sample b's ROI rows and the K bins of roi_align_loss(latent_hidden_b, ...)
            (0 for a sample without an ROI)

Modes (``Stage1Config.mode``):
- ``recurrent``: the exact latent recurrence (medlvr.train.latent.recurrent_forward): prefix
  forward, K-1 single-token steps through a gradient-carrying KV cache, suffix in one pass.
- ``teacher-forced``: one forward with the latent inputs replaced by the pooled ROI targets
  (LVR-style); the alignment term is on the hidden states at s0 + t - 1, the positions whose
  output would be fed back at inference. Samples without an ROI get the mean vision token of
  their first image in every latent slot (medlvr.train.latent.pooled_roi_targets).
- K = 0: plain SFT (no latent segment; the baseline (a) of the demo).

The trainable model (:func:`build_trainable`): full fine-tuning, or LoRA (peft) on the language
model's q/k/v/o projections plus the rows of the new latent special tokens (their embeddings
start random, so they must learn). An optional latent projector (identity at init) is part of
the module and saved with it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medlvr.models.hf import unwrap, vision_tokens
from medlvr.train import latent as L

MODES = ("recurrent", "teacher-forced")


@dataclass
class Stage1Config:
    k_latent: int = 4
    mode: str = "recurrent"
    roi_weight: float = 1.0
    roi_loss: str = "cosine"
    roi_pooling: str = "area"
    projector: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.k_latent, int) or self.k_latent < 0:
            raise ValueError(f"k_latent: expected an int >= 0, got {self.k_latent!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.roi_loss not in ("cosine", "mse"):
            raise ValueError(f"roi_loss: expected 'cosine' or 'mse', got {self.roi_loss!r}")
        if self.roi_pooling not in ("area", "bilinear"):
            raise ValueError(f"roi_pooling: expected 'area' or 'bilinear', got {self.roi_pooling!r}")
        if self.roi_weight < 0:
            raise ValueError(f"roi_weight: expected >= 0, got {self.roi_weight}")


class LatentLM(nn.Module):
    """The trainable unit: HF model (maybe peft-wrapped) + optional latent projector.

    ``forward(batch)`` returns the stage-1 loss dict, so DDP / FSDP wrap this module and its
    forward is what they hook (latent.py calls the inner HF modules directly)."""

    def __init__(self, model: nn.Module, cfg: Stage1Config):
        super().__init__()
        self.model = model
        self.cfg = cfg
        hidden = unwrap(model).config.text_config.hidden_size
        self.projector = L.LatentProjector(hidden) if cfg.projector else None

    @property
    def hf(self) -> nn.Module:
        return unwrap(self.model)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        k = cfg.k_latent
        if k == 0:
            out = L.forward_with_latents(self.model, batch, None, k=0)
            roi = torch.zeros_like(out.ce)
        elif cfg.mode == "recurrent":
            out = L.recurrent_forward(self.model, batch, k=k, projector=self.projector)
            roi = self._roi(out.latent_hidden, out.vision_tokens, batch)
        else:
            vis = vision_tokens(self.model, batch.get("pixel_values"), batch.get("image_grid_thw"))
            targets = L.pooled_roi_targets(vis, batch, k=k, merge=self.hf.config.vision_config.spatial_merge_size)
            out = L.forward_with_latents(self.model, batch, targets, k=k, vis=vis)
            roi = self._roi(out.latent_hidden, vis, batch)
        has_roi = torch.zeros_like(out.ce)
        if batch.get("roi_sample") is not None and batch["roi_sample"].numel():
            has_roi[batch["roi_sample"].to(has_roi.device)] = 1.0
        loss = (out.ce + cfg.roi_weight * roi).mean()
        return {"loss": loss, "ce": out.ce.detach().mean(), "roi": roi.detach().sum() / has_roi.sum().clamp(min=1),
                "roi_frac": has_roi.mean(), "tokens": out.n_tokens.sum().float()}

    def _roi(self, latent_hidden, vis, batch) -> torch.Tensor:
        if self.cfg.roi_weight == 0 or vis is None:
            return latent_hidden.new_zeros(latent_hidden.shape[0], dtype=torch.float32)
        return L.roi_alignment(latent_hidden, vis, batch, loss=self.cfg.roi_loss, pooling=self.cfg.roi_pooling)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone().contiguous() for n, t in self.state_dict().items() if n in names}


def build_trainable(model: nn.Module, processor: Any, cfg: Stage1Config) -> LatentLM:
    """Wrap the HF model for training: LoRA (peft) or full fine-tuning, then the LatentLM module."""
    from medlvr.models import latent_token_ids

    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        ids = latent_token_ids(processor)
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            # The language model's attention projections only: the vision tower stays frozen
            # (its tokens are the ROI targets).
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
            # New special tokens start from random rows; train those rows (and only those).
            trainable_token_indices={"embed_tokens": [ids.start, ids.end, ids.pad]},
        )
        model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return LatentLM(model, cfg)


def save_run_config(path: Path, *, base: str, cfg: Stage1Config, extra: dict | None = None) -> None:
    """run.json beside the weights: what to rebuild before loading them (base model, LoRA, K, mode)."""
    d = {"base": base, "stage1": asdict(cfg)}
    d.update(extra or {})
    path.write_text(json.dumps(d, indent=2))


def load_trained(run_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(LatentLM, processor, run_config) from a directory holding run.json + model.safetensors
    (a finished run's ``final/`` or any checkpoint)."""
    from safetensors.torch import load_file

    from medlvr.models import load

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"run_dir: expected {meta_path} (written by medlvr sft / vlpo), not found")
    meta = json.loads(meta_path.read_text())
    model, processor = load(meta["base"], dtype=dtype, device=device)
    lm = build_trainable(model, processor, Stage1Config(**meta["stage1"]))
    state = load_file(str(run_dir / "model.safetensors"))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{run_dir / 'model.safetensors'}: unexpected keys {unexpected[:5]}")
    lm.to(device)
    lm.eval()
    return lm, processor, meta


# ----------------------------------------------------------------------------- CLI


def add_stage1_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.train.loop import add_loop_arguments

    p.add_argument("--data", required=True, help="training JSONL (medlvr format)")
    p.add_argument("--model", default="default", help="'default' (embedded small Qwen2.5-VL) or a local checkpoint dir")
    p.add_argument("--k-latent", type=int, default=4, help="latent steps K (0 = plain SFT)")
    p.add_argument("--mode", choices=MODES, default="recurrent")
    p.add_argument("--roi-weight", type=float, default=1.0, help="lambda of the ROI alignment term")
    p.add_argument("--roi-loss", choices=("cosine", "mse"), default="cosine")
    p.add_argument("--roi-pooling", choices=("area", "bilinear"), default="area")
    p.add_argument("--projector", action="store_true", help="learned latent feedback projector (identity at init)")
    p.add_argument("--lora", action="store_true", help="LoRA on q/k/v/o of the language model (else full fine-tuning)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--split", default="train", help="records of this split are used (others ignored)")
    add_loop_arguments(p)


def stage1_main(args: argparse.Namespace) -> dict:
    from medlvr.models import load
    from medlvr.train.data import load_split
    from medlvr.train.loop import loop_config_from_args, train_loop

    records = load_split(args.data, args.split, skip_bad=args.skip_bad, window=getattr(args, "window", None))
    cfg = Stage1Config(k_latent=args.k_latent, mode=args.mode, roi_weight=args.roi_weight, roi_loss=args.roi_loss,
                       roi_pooling=args.roi_pooling, projector=args.projector, lora=args.lora, lora_r=args.lora_r,
                       lora_alpha=args.lora_alpha)
    lcfg = loop_config_from_args(args)
    model, processor = load(args.model, dtype=torch.float32, seed=lcfg.seed)
    lm = build_trainable(model, processor, cfg)
    return train_loop(lm, processor, records, lcfg, base=args.model, desc=f"sft K={cfg.k_latent} {cfg.mode}")


__all__ = ["Stage1Config", "LatentLM", "build_trainable", "load_trained", "save_run_config",
           "add_stage1_arguments", "stage1_main", "MODES", "field"]
