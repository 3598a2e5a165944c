"""Stage 1's loss terms: a registry, so that a new term is a module plus one registration.

The stage-1 loss of a batch of B samples is the answer cross-entropy plus each registered term
at its weight, every term a per-sample value averaged over the batch (per-sample means keep the
loss linear in samples, so DDP over equal per-process shards equals one process on the global
batch)::

    loss = mean_b CE_b + sum_terms  w_term * mean_b term_b

A term is ``fn(TermInputs) -> (value [B] fp32, applies [B] float 0/1)``: ``applies`` marks the
samples the term is defined for (the ROI term: samples with an ROI; a sample it does not apply
to contributes 0). The objective (medlvr/train/sft/objective.py) reports, for every term,
``<name>`` (the mean of the value over the samples it applies to) and ``<name>_frac`` (the share
of such samples) without knowing the names. ``weight`` is a number or a function of the stage-1
config (the ROI term's is ``--roi-weight``); a weight of 0 leaves the term out of the loss and
keeps it in the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from medlvr.policy import Batch, LatentLM, LatentOutput
from medlvr.registry import Entry, Registry

__all__ = ["TermInputs", "LossTerm", "LOSS_TERMS", "register_loss_term", "unregister_loss_term"]


@dataclass(frozen=True)
class TermInputs:
    """What a term sees: the policy, the batch, the policy's training pass over it, the config."""
    lm: LatentLM
    batch: Batch
    out: LatentOutput
    cfg: Any


LossTerm = Entry  # name, fn(TermInputs) -> (value [B], applies [B]), weight

LOSS_TERMS = Registry("loss term", reserved=("loss", "ce", "tokens"),
                      signature="(TermInputs) -> (value [B], applies [B])", negative_weights=False)


def register_loss_term(name: str, fn: Callable[[TermInputs], tuple[torch.Tensor, torch.Tensor]], *,
                       weight: float | Callable[[Any], float] = 1.0) -> LossTerm:
    """Add a stage-1 loss term under ``name`` (its metric names are ``name`` and ``name_frac``)."""
    return LOSS_TERMS.register(name, fn, weight=weight)


def unregister_loss_term(name: str) -> None:
    LOSS_TERMS.unregister(name)
