"""Stage 1 of MedLVR: ROI-supervised latent fine-tuning (``medlvr sft``).

Loss of one batch of B samples (per-sample means keep it linear in samples, so DDP over equal
per-process shards equals one process on the global batch, and partial ROI annotation just
zeroes a sample's second term):

    loss = 1/B · Σ_b [ CE_b(answer tokens) + λ · ROI_b ]
    ROI_b = mean over sample b's ROI rows and the K bins of roi_align_loss(latent_hidden_b, ...)
            (0 for a sample without an ROI)

Modes (``Stage1Config.mode``):
- ``recurrent``: the exact latent recurrence (medlvr.policy.latent.recurrent_forward): prefix
  forward, K-1 single-token steps through a gradient-carrying KV cache, suffix in one pass.
- ``teacher-forced``: one forward with the latent inputs replaced by the pooled ROI targets
  (LVR-style); the alignment term is on the hidden states at s0 + t - 1, the positions whose
  output would be fed back at inference. Samples without an ROI get the mean vision token of
  their first image in every latent slot (medlvr.train.sft.roi.pooled_roi_targets).
- K = 0: plain SFT (no latent segment; the baseline (a) of the demo).

The trainable model (:func:`build_trainable`): full fine-tuning, or LoRA (peft) on the language
model's q/k/v/o projections plus the rows of the new latent special tokens (their embeddings
start random, so they must learn). An optional latent projector (identity at init) is part of
the module and saved with it.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from medlvr.models import qwen_vl
from medlvr.models.hf import hidden_size, unwrap, vision_tokens
from medlvr.data.collate import Batch, collate
from medlvr.train.flags import add_config_arguments, config_from_args, opt
from medlvr.policy.latent import LatentProjector, forward_with_latents, recurrent_forward
from medlvr.train.sft.roi import pooled_roi_targets, roi_alignment
from medlvr.policy.run_dir import RunDir, run_meta

MODES = ("recurrent", "teacher-forced")
ROI_LOSSES = ("cosine", "mse")
ROI_POOLINGS = ("area", "bilinear")


@dataclass
class Stage1Config:
    """The stage-1 method; each field's metadata makes its ``medlvr sft`` flag (medlvr/train/flags.py)."""
    k_latent: int = opt(4, "latent steps K (0 = plain SFT)")
    mode: str = opt("recurrent", "recurrent = the exact latent recurrence, hidden state fed back (default); "
                                 "teacher-forced = one forward with the pooled ROI targets as latent inputs (LVR-style)",
                    choices=MODES)
    roi_weight: float = opt(1.0, "lambda of the ROI alignment term")
    roi_loss: str = opt("cosine", "ROI alignment distance between latent k and its pooled target (default cosine: "
                                  "1 - cos)", choices=ROI_LOSSES)
    roi_pooling: str = opt("area", "pooling of the vision tokens inside the ROI into K targets: area = "
                                   "overlap-weighted mean per bin, bilinear = RoIAlign (default area)",
                           choices=ROI_POOLINGS)
    projector: bool = opt(False, "learned latent feedback projector (identity at init)")
    lora: bool = opt(False, "LoRA on q/k/v/o of the language model (else full fine-tuning)")
    lora_r: int = opt(16, "LoRA rank, with --lora (default 16)")
    lora_alpha: int = opt(32, "LoRA alpha (scale alpha/r), with --lora (default 32)")
    lora_dropout: float = opt(0.0, None)  # no flag: the command line trains LoRA without dropout

    def __post_init__(self):
        if not isinstance(self.k_latent, int) or self.k_latent < 0:
            raise ValueError(f"k_latent: expected an int >= 0, got {self.k_latent!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.roi_loss not in ROI_LOSSES:
            raise ValueError(f"roi_loss: expected 'cosine' or 'mse', got {self.roi_loss!r}")
        if self.roi_pooling not in ROI_POOLINGS:
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
        self.projector = LatentProjector(hidden_size(model)) if cfg.projector else None

    @property
    def base(self) -> nn.Module:
        return unwrap(self.model)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        k = cfg.k_latent
        if k == 0:
            out = forward_with_latents(self.model, batch, None, k=0, ce_mean=True)
            roi = torch.zeros_like(out.ce)
        elif cfg.mode == "recurrent":
            out = recurrent_forward(self.model, batch, k=k, projector=self.projector, ce_mean=True)
            roi = self._roi(out.latent_hidden, out.vision_tokens, batch)
        else:
            vis = vision_tokens(self.model, batch.pixel_values, batch.image_grid_thw)
            targets = pooled_roi_targets(vis, batch, k=k, merge=qwen_vl.model_merge(self.base.config))
            out = forward_with_latents(self.model, batch, targets, k=k, vis=vis, ce_mean=True)
            roi = self._roi(out.latent_hidden, vis, batch)
        has_roi = torch.zeros_like(out.ce)
        if batch.roi_sample.numel():
            has_roi[batch.roi_sample.to(has_roi.device)] = 1.0
        # = (ce + roi_weight * roi).mean(); the CE mean is one fused op whose gradients are
        # computed in its forward (medlvr.ops.fused_linear_cross_entropy).
        loss = out.ce_mean + cfg.roi_weight * roi.mean()
        return {"loss": loss, "ce": out.ce.detach().mean(), "roi": roi.detach().sum() / has_roi.sum().clamp(min=1),
                "roi_frac": has_roi.mean(), "tokens": out.n_tokens.sum().float()}

    def _roi(self, latent_hidden, vis, batch) -> torch.Tensor:
        if self.cfg.roi_weight == 0 or vis is None:
            return latent_hidden.new_zeros(latent_hidden.shape[0], dtype=torch.float32)
        return roi_alignment(latent_hidden, vis, batch.roi_sample, batch.roi_geometry, loss=self.cfg.roi_loss,
                             pooling=self.cfg.roi_pooling)

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
            target_modules=qwen_vl.LORA_TARGETS,
            # New special tokens start from random rows; train those rows (and only those).
            trainable_token_indices={"embed_tokens": [ids.start, ids.end, ids.pad]},
        )
        model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return LatentLM(model, cfg)


# ----------------------------------------------------------------------------- the objective


class EpochSampler(torch.utils.data.Sampler):
    """Permutation of range(n) that depends on (seed, epoch) only (no RNG state involved, so a
    resumed run draws the same order)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class _Collator:
    """Records -> a collate Batch (accelerate's loader moves it with Batch.to)."""

    def __init__(self, processor, k_latent: int):
        from medlvr.models import latent_token_ids

        self.processor, self.k, self.ids, self.cache = processor, k_latent, latent_token_ids(processor), {}

    def __call__(self, records) -> Batch:
        return collate(records, self.processor, k_latent=self.k, with_answer=True, latent_token_ids=self.ids,
                       images_cache=self.cache)


class SFTObjective:
    """Stage 1 in the shared loop (medlvr/train/loop.py): one step is one optimizer update on
    the GLOBAL batch (``batch_size`` samples split over the processes by accelerate's
    ``split_batches``; ``grad_accum`` micro-batches of that size per update), so a run's
    steps, schedule and data order do not depend on the number of processes.

    Data order: epoch e is a permutation of the records drawn from (seed, e) alone; the data
    position is (epoch, micro-batch index in the epoch). A partial last micro-batch is
    dropped, so every update sees the same number of samples.

    Runs sharded (``--fsdp``, medlvr/policy/fsdp.py): the loss is a per-sample mean over the
    global batch whatever holds the weights."""
    supports_fsdp = True

    def __init__(self, lm: LatentLM, processor: Any, records: Sequence[Any], cfg: Any):
        if len(records) < cfg.batch_size:
            raise ValueError(f"records: expected at least batch_size={cfg.batch_size} records, got {len(records)}")
        self.module, self.cfg = lm, cfg
        self.sampler = EpochSampler(len(records), cfg.seed)
        self.loader = torch.utils.data.DataLoader(list(records), batch_size=cfg.batch_size, sampler=self.sampler,
                                                  drop_last=True, collate_fn=_Collator(processor, lm.cfg.k_latent),
                                                  num_workers=0)
        self.epoch = self.micro = 0
        self._batches: Iterator | None = None
        self._t0: float | None = None
        self._steps_timed = 0
        lm.train()

    def start(self, updater) -> None:
        acc = updater.accelerator
        if self.cfg.batch_size % acc.num_processes:
            raise ValueError(f"batch_size: expected a multiple of the {acc.num_processes} processes, got {self.cfg.batch_size}")
        self.loader = acc.prepare(self.loader)

    def position(self) -> dict:
        return {"epoch": self.epoch, "micro": self.micro}

    def seek(self, state: dict) -> None:
        self.epoch, self.micro = state["epoch"], state["micro"]

    def _micro_batches(self) -> Iterator[tuple[int, int, Batch]]:
        """Endless (epoch, index-in-epoch after this batch, batch), starting at the position."""
        from accelerate.data_loader import skip_first_batches

        epoch, skip = self.epoch, self.micro
        while True:
            # The prepared loader re-sets its sampler's epoch from its own counter at each __iter__
            # (skip_first_batches copies that counter): set both so they agree after a resume.
            self.loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            i = skip
            for batch in skip_first_batches(self.loader, skip) if skip else self.loader:
                i += 1
                yield epoch, i, batch
            epoch, skip = epoch + 1, 0

    def step(self, updater, step: int) -> dict:
        cfg = self.cfg
        if self._batches is None:
            self._batches, self._t0 = self._micro_batches(), time.perf_counter()
        agg = {"loss": 0.0, "ce": 0.0, "roi": 0.0, "roi_frac": 0.0, "tokens": 0.0}
        for j in range(cfg.grad_accum):
            self.epoch, self.micro, batch = next(self._batches)
            # Micro-batches before the last one accumulate locally (no gradient all-reduce).
            with updater.accumulating(sync=j == cfg.grad_accum - 1):
                with updater.autocast():
                    res = updater.module(batch)
                    loss = res["loss"] / cfg.grad_accum
                updater.backward(loss)
            for key in agg:
                total = key == "tokens"
                agg[key] += updater.reduce(res[key].detach().float(), "sum" if total else "mean") / (
                    1 if total else cfg.grad_accum)
        gnorm = updater.update()
        self._steps_timed += 1
        elapsed = time.perf_counter() - self._t0
        return {"step": step + 1, "epoch": self.epoch, **agg, "grad_norm": float("nan") if gnorm is None else gnorm,
                "lr": updater.lr(), "samples_per_s": self._steps_timed * cfg.batch_size * cfg.grad_accum / max(elapsed, 1e-9),
                "tokens_per_s": agg["tokens"] * self._steps_timed / max(elapsed, 1e-9), "elapsed_s": elapsed}

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}", "ce": f"{row['ce']:.3f}", "roi": f"{row['roi']:.3f}",
                "sps": f"{row['samples_per_s']:.1f}"}


def train_stage1(lm: LatentLM, processor: Any, records: Sequence[Any], cfg: Any, *, base: str = "default",
                 desc: str = "train", accelerator: Any = None, extra_meta: dict | None = None) -> dict:
    """Train ``lm`` on ``records`` with the shared loop (cfg: a loop.LoopConfig); returns the
    last logged metrics plus ``final_dir`` (<out>/final, a run folder: medlvr/policy/run_dir.py)."""
    from medlvr.train.loop import train_loop

    meta = run_meta(base=base, stage1=lm.cfg, loop=asdict(cfg), **(extra_meta or {}))
    return train_loop(SFTObjective(lm, processor, records, cfg), cfg, accelerator=accelerator, desc=desc, meta=meta)


def load_trained(run_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(LatentLM, processor, meta) from a run folder (a finished run's ``final/`` or any
    checkpoint, medlvr/policy/run_dir.py): the base model rebuilt from run.json, LoRA / projector
    as its stage-1 config says, then the saved weights; in eval mode on ``device``. Here and
    not in runs.py, because building the trainable unit is stage 1's (runs.py stays below it)."""
    from medlvr.models import load

    run = RunDir(Path(run_dir))
    meta = run.meta()
    # The embedded base is built from a seed: the run's (stage 1 builds it from --seed). A
    # LoRA run's weights are deltas on that base, so another seed is another model.
    seed = int(meta.get("base_seed", meta.get("loop", {}).get("seed", 0)))
    model, processor = load(meta["base"], dtype=dtype, device=device, seed=seed)
    lm = build_trainable(model, processor, Stage1Config(**meta["stage1"]))
    run.load_weights(lm)
    lm.to(device)
    lm.eval()
    return lm, processor, meta


# ----------------------------------------------------------------------------- CLI


def add_stage1_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.train.loop import add_loop_arguments

    p.add_argument("--data", required=True, help="training JSONL (medlvr format)")
    p.add_argument("--model", default="default", help="'default' (embedded small Qwen2.5-VL) or a local checkpoint dir")
    add_config_arguments(p, Stage1Config)
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--split", default="train", help="records of this split are used (others ignored)")
    add_loop_arguments(p)


def stage1_main(args: argparse.Namespace) -> dict:
    from medlvr.models import load
    from medlvr.data.records import load_split
    from medlvr.train.loop import LoopConfig

    records = load_split(args.data, args.split, skip_bad=args.skip_bad, window=getattr(args, "window", None))
    cfg = config_from_args(Stage1Config, args)
    lcfg = config_from_args(LoopConfig, args)
    model, processor = load(args.model, dtype=torch.float32, seed=lcfg.seed)
    # The new weights (LoRA A, the projector) from --seed too: a rerun, and every process of a
    # sharded run (medlvr/policy/fsdp.py checks they agree), starts from the same init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lcfg.seed)
        lm = build_trainable(model, processor, cfg)
    return train_stage1(lm, processor, records, lcfg, base=args.model, desc=f"sft K={cfg.k_latent} {cfg.mode}")


__all__ = ["Stage1Config", "LatentLM", "build_trainable", "load_trained", "SFTObjective", "train_stage1",
           "add_stage1_arguments", "stage1_main", "MODES"]
