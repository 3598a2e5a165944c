"""Stage 1 of MedLVR in the shared loop: ROI-supervised latent fine-tuning (``medlvr sft``).

Loss of one batch of B samples: the answer cross-entropy of the policy's training pass plus
every registered loss term at its weight (medlvr/train/sft/terms.py; the ROI alignment term
"roi" is medlvr/train/sft/roi.py)::

    loss = 1/B · Σ_b [ CE_b + Σ_terms w_term · term_b ]      (ROI_b = 0 for a sample without an ROI)

Modes (``Stage1Config.mode``), i.e. how the policy makes its latent inputs
(medlvr/policy/model.py):

- ``recurrent``: the exact latent recurrence (medlvr.policy.latent.recurrent_forward): prefix
  forward, K-1 single-token steps through a gradient-carrying KV cache, suffix in one pass.
- ``teacher-forced``: one forward with the latent inputs replaced by the pooled ROI targets
  (LVR-style; medlvr.train.sft.roi.roi_teacher); the alignment term is on the hidden states at
  P + t - 1, the positions whose output would be fed back at inference. Samples without an ROI
  get the mean vision token of their first image in every latent slot.
- K = 0: plain SFT (no latent segment; the baseline (a) of the demo).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from medlvr.data.collate import collate
from medlvr.policy import Batch, LatentLM, PolicyConfig, policy_tokens, run_meta
from medlvr.train.sft import roi  # noqa: F401  (registers the "roi" term)
from medlvr.train.sft.config import Stage1Config
from medlvr.train.sft.terms import LOSS_TERMS, TermInputs

__all__ = ["SFTObjective", "EpochSampler", "stage1_loss", "train_stage1"]


def stage1_loss(lm: LatentLM, batch: Batch, cfg: Stage1Config | None = None, *,
                module: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) of one micro-batch: ``module`` (default ``lm``; in the loop the prepared
    LatentLM, whose forward DDP / FSDP hook) runs the training pass, then the CE mean and every
    registered term at its weight under ``cfg`` (default: ``lm.cfg`` as stage 1's).
    Metrics: "loss", "ce", each term's "<name>" and "<name>_frac", "tokens" (detached tensors)."""
    cfg = as_stage1(lm.cfg) if cfg is None else cfg
    module = lm if module is None else module
    teacher = roi.roi_teacher(lm) if cfg.mode == "teacher-forced" and cfg.k_latent > 0 else None
    out = module(batch, teacher=teacher)
    # ce_mean = ce.mean(): one fused op whose gradients are computed in its forward
    # (medlvr.ops.fused_linear_cross_entropy).
    loss = out.ce_mean
    metrics = {"ce": out.ce.detach().mean()}
    x = TermInputs(lm=lm, batch=batch, out=out, cfg=cfg)
    for name, term in LOSS_TERMS.items():
        value, applies = term.fn(x)
        w = term.weight_for(cfg)
        if w:
            loss = loss + w * value.mean()
        metrics[name] = value.detach().sum() / applies.sum().clamp(min=1)
        metrics[f"{name}_frac"] = applies.float().mean()
    metrics["tokens"] = out.n_tokens.sum().float()
    return loss, {"loss": loss.detach(), **metrics}


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

    def __init__(self, processor, k_latent: int, prompt):
        self.processor, self.k, self.ids, self.cache = processor, k_latent, policy_tokens(processor).latent, {}
        self.prompt = prompt

    def __call__(self, records) -> Batch:
        return collate(records, self.processor, k_latent=self.k, with_answer=True, latent_token_ids=self.ids,
                       images_cache=self.cache, prompt=self.prompt)


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

    def __init__(self, lm: LatentLM, processor: Any, records: Sequence[Any], cfg: Any,
                 stage1: Stage1Config | None = None):
        if len(records) < cfg.batch_size:
            raise ValueError(f"records: expected at least batch_size={cfg.batch_size} records, got {len(records)}")
        self.module, self.lm, self.cfg = lm, lm, cfg
        self.stage1 = stage1 if stage1 is not None else as_stage1(lm.cfg)
        self.sampler = EpochSampler(len(records), cfg.seed)
        self.loader = torch.utils.data.DataLoader(list(records), batch_size=cfg.batch_size, sampler=self.sampler,
                                                  drop_last=True, collate_fn=_Collator(processor, lm.k_latent, lm.prompt),
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
        agg: dict[str, float] = {}
        for j in range(cfg.grad_accum):
            self.epoch, self.micro, batch = next(self._batches)
            # Micro-batches before the last one accumulate locally (no gradient all-reduce).
            with updater.accumulating(sync=j == cfg.grad_accum - 1):
                with updater.autocast():
                    loss, res = stage1_loss(self.lm, batch, self.stage1, module=updater.module)
                    loss = loss / cfg.grad_accum
                updater.backward(loss)
            for key, value in res.items():
                total = key == "tokens"
                agg[key] = agg.get(key, 0.0) + updater.reduce(value.float(), "sum" if total else "mean") / (
                    1 if total else cfg.grad_accum)
        gnorm = updater.update()
        self._steps_timed += 1
        elapsed = time.perf_counter() - self._t0
        return {"step": step + 1, "epoch": self.epoch, **agg, "grad_norm": float("nan") if gnorm is None else gnorm,
                "lr": updater.lr(), "samples_per_s": self._steps_timed * cfg.batch_size * cfg.grad_accum / max(elapsed, 1e-9),
                "tokens_per_s": agg["tokens"] * self._steps_timed / max(elapsed, 1e-9), "elapsed_s": elapsed}

    def postfix(self, row: dict) -> dict:
        shown = ["loss", "ce", *LOSS_TERMS]
        return {**{k: f"{row[k]:.3f}" for k in shown if k in row}, "sps": f"{row['samples_per_s']:.1f}"}


def as_stage1(cfg: PolicyConfig) -> Stage1Config:
    """A policy config as stage 1's (the objective's settings at their defaults when it has none)."""
    return cfg if isinstance(cfg, Stage1Config) else Stage1Config(**asdict(cfg))


def train_stage1(lm: LatentLM, processor: Any, records: Sequence[Any], cfg: Any, *, base: str = "default",
                 desc: str = "train", accelerator: Any = None, extra_meta: dict | None = None,
                 stage1: Stage1Config | None = None) -> dict:
    """Train ``lm`` on ``records`` with the shared loop (cfg: a loop.LoopConfig) and the stage-1
    objective ``stage1`` (default: ``lm.cfg`` when it is a Stage1Config); returns the last logged
    metrics plus ``final_dir`` (<out>/final, a run folder: medlvr/policy/run_dir.py)."""
    from medlvr.train.loop import train_loop

    objective = SFTObjective(lm, processor, records, cfg, stage1=stage1)
    meta = run_meta(base=base, stage1=objective.stage1, loop=asdict(cfg), prompt=lm.prompt.to_meta(),
                    **(extra_meta or {}))
    return train_loop(objective, cfg, accelerator=accelerator, desc=desc, meta=meta)
