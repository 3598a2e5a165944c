"""Stage 1's ROI supervision: the per-sample alignment term between the latent states and the
image evidence inside each annotated box (registered as the loss term "roi",
medlvr/train/sft/terms.py), and the pooled box targets that teacher forcing feeds at the latent
positions (:func:`roi_teacher`).

The op is medlvr.ops.roi_align_loss (reference: medlvr/reference/roi_align.py); collate
(medlvr/data/collate.py) prepares each batch's box geometry once on the CPU with
:func:`roi_bins`, so the loss call on the GPU neither syncs nor recomputes it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from medlvr.ops.roi_align_loss import roi_align_loss, roi_pool_targets
from medlvr.policy import LatentLM, families, roi_bins
from medlvr.train.sft.terms import TermInputs, register_loss_term

if TYPE_CHECKING:
    from medlvr.ops.roi_geometry import RoiGeometry

__all__ = ["roi_alignment", "pooled_roi_targets", "roi_term", "roi_teacher"]


def roi_alignment(latent_hidden: torch.Tensor, vis: torch.Tensor | None, roi_sample: torch.Tensor,
                  geometry: "RoiGeometry | None", *, loss: str = "cosine", pooling: str = "area") -> torch.Tensor:
    """Per-sample alignment term [B]: mean over the sample's ROI rows, 0 without an ROI.

    latent_hidden [B,K,D] (the h fed back); roi_sample [R] (a Batch's ``roi_sample``): row r of
    the ROI table uses sample roi_sample[r]'s latents against the vision tokens and box that
    ``geometry`` (a Batch's ``roi_geometry``, prepared by collate: boxes checked once, no
    device sync in the loss) lays out for row r."""
    B, K, _ = latent_hidden.shape
    out = latent_hidden.new_zeros(B, dtype=torch.float32)
    if roi_sample.shape[0] == 0 or vis is None:
        return out
    sample = roi_sample.to(latent_hidden.device).long()
    if geometry is None:
        raise ValueError("geometry: ROI rows need their roi_geometry (collate prepares it with "
                         "medlvr.ops.prepare_roi_geometry), got None")
    per_row = roi_align_loss(latent_hidden[sample], vis, geometry=geometry.to(vis.device), bins=roi_bins(K),
                             pooling=pooling, loss=loss, reduction="none")
    if per_row.dim() > 1:
        per_row = per_row.reshape(per_row.shape[0], -1).mean(dim=1)
    # Per-sample sums as a masked (B, R) sum over rows, not index_add: on CUDA index_add of
    # floats uses atomics, whose order (hence the fp32 rounding) varies from run to run, so
    # the stage-1 term would not be deterministic although roi_align_loss is. A reduction over a
    # fixed axis is. R (boxes per batch) is small, so the (B, R) mask costs nothing.
    member = (sample[None, :] == torch.arange(B, device=sample.device)[:, None]).to(torch.float32)
    counts = member.sum(1)
    out = (member * per_row.float()[None, :]).sum(1)
    return out / counts.clamp(min=1)


def pooled_roi_targets(vis: torch.Tensor, batch, *, k: int, merge: int, family) -> torch.Tensor:
    """[B, K, D] teacher-forcing inputs: the K area-pooled bins of each sample's FIRST ROI box.

    batch: a medlvr.policy.Batch, read by attribute; family: the model's family module
    (medlvr/policy/families.py), which says how many tokens each image puts in the sequence.

    A sample without an ROI gets the mean vision token of its first image in every slot (the
    least informative target that is still on the visual manifold; chosen over skipping the
    latent slots so that every sample keeps the same sequence layout as at inference); a
    sample without an image gets zeros. Targets are detached: they are inputs, not a path for
    gradients into the vision tower.
    """
    B = batch.input_ids.shape[0]
    grid = batch.image_grid_thw
    counts = family.tokens_per_image(grid, merge).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    v = vis.detach()
    out = v.new_zeros(B, k, v.shape[-1])
    for b, i in enumerate(_first_image_per_sample(batch.mm_token_type_ids, len(counts))):
        if i >= 0:
            out[b] = v[starts[i]:starts[i + 1]].mean(0)
    boxes = batch.roi_boxes
    if boxes.shape[0] > 0:
        first_row: dict[int, int] = {}
        for r, b in enumerate(batch.roi_sample.tolist()):
            first_row.setdefault(b, r)
        rows = torch.tensor(sorted(first_row.values()), dtype=torch.long)
        tg = roi_pool_targets(v, grid, boxes[rows].float(), batch.roi_image[rows].long(),
                              bins=roi_bins(k), pooling="area", merge=merge)
        for j, r in enumerate(rows.tolist()):
            out[batch.roi_sample[r]] = tg[j].to(out.dtype)
    return out


def _first_image_per_sample(mm_token_type_ids: torch.Tensor, n_images: int) -> list[int]:
    """Index of each sample's first image in packing order (-1: no image). Images are packed in
    sample order, one run of image tokens per image."""
    t = (mm_token_type_ids == 1).long()
    runs = (t[:, 1:] > t[:, :-1]).sum(1) + t[:, 0]
    out, nxt = [], 0
    for c in runs.tolist():
        out.append(nxt if c > 0 and nxt < n_images else -1)
        nxt += c
    return out


def roi_term(x: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The "roi" loss term: :func:`roi_alignment` of the fed-back states per sample, and which
    samples carry an ROI. Zero without latents (K = 0), without images, or at weight 0 (then
    not computed)."""
    out, batch, cfg = x.out, x.batch, x.cfg
    has_roi = torch.zeros_like(out.ce)
    if batch.roi_sample.numel():
        has_roi[batch.roi_sample.to(has_roi.device)] = 1.0
    if out.latent_hidden is None or cfg.roi_weight == 0 or out.vision_tokens is None:
        return torch.zeros_like(out.ce, dtype=torch.float32), has_roi
    value = roi_alignment(out.latent_hidden, out.vision_tokens, batch.roi_sample, batch.roi_geometry,
                          loss=cfg.roi_loss, pooling=cfg.roi_pooling)
    return value, has_roi


def roi_teacher(lm: LatentLM):
    """The latent inputs of teacher-forced stage 1 (``mode="teacher-forced"``, LVR-style): each
    sample's pooled ROI bins (:func:`pooled_roi_targets`), for ``LatentLM.forward(teacher=...)``."""
    family = families.of_model(lm.model)
    k, merge = lm.k_latent, family.model_merge(lm.base.config)
    return lambda vis, batch: pooled_roi_targets(vis, batch, k=k, merge=merge, family=family)


register_loss_term("roi", roi_term, weight=lambda cfg: cfg.roi_weight)
