"""Latent-segment forward passes of a Qwen2.5-VL model: the training-side math of MedLVR.

Shared by stage 1 (``medlvr.train.stage1``) and stage 2 (``medlvr.train.vlpo``). Everything
here works on one collated batch (``medlvr.train.collate``, right-padded for training) and
an HF ``Qwen2_5_VLForConditionalGeneration`` (possibly wrapped by peft / DDP / FSDP).

Sequence of sample b (``s0 = latent_start_index[b]``, the first <|latent_pad|>)::

    [0, s0)            prefix: chat header, image tokens, question, ends with <|latent_start|>
    [s0, s0 + K)       K latent positions (input_ids hold <|latent_pad|> so that get_rope_index
                       gives them text positions +1 per step; their EMBEDDINGS are replaced)
    [s0 + K, L_b)      suffix: <|latent_end|> answer <|im_end|>

The shift (binding, also for VLPO): the input fed at latent position s0 + t is
``z_t = feedback(h[s0 + t - 1])`` where h is the post-final-norm last hidden state, so
``z_0 = feedback(h at <|latent_start|>)``. ``mu_t`` (VLPO) is the current policy's h at the same
position s0 + t - 1: :func:`latent_mu` gathers it from a full forward.

Public functions (shapes: B samples, S sequence, K latent steps, D hidden, T vision tokens):

- :func:`recurrent_forward` — exact latent recurrence: the prefix forward, then single-token
  steps through a gradient-carrying DynamicCache, then the suffix in one pass. Returns
  per-sample CE and the latent states. Equal (fp32) to :func:`coconut_reference`, K+1 full passes.
- :func:`forward_with_latents` — ONE full forward with the K latent inputs given (teacher
  forcing with pooled ROI targets; VLPO re-scoring of rollouts with their fed-back z).
- :func:`latent_mu` — h at s0 + t - 1 for t < K from a full forward's hidden states.
- the pieces (vision tokens, embeddings, positions, the decoder call) come from medlvr/models/hf.py.
- :func:`per_sample_ce` — CE averaged over each sample's answer tokens ([B]), from logits (the
  reference); :func:`answer_ce` — the same from hidden states via the fused lm_head log-prob op.
- :func:`roi_alignment` — per-sample ROI alignment term ([B], 0 for samples without an ROI).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlvr.models.hf import embed_inputs, new_cache, positions, run_decoder, unwrap, vision_tokens
from medlvr.ops.fused_logprobs import lm_head_logprobs
from medlvr.ops.roi_align_loss import roi_align_loss

__all__ = [
    "LatentOutput",
    "LatentProjector",
    "forward_with_latents",
    "recurrent_forward",
    "coconut_reference",
    "latent_mu",
    "per_sample_ce",
    "answer_ce",
    "roi_bins",
    "roi_alignment",
    "pooled_roi_targets",
]


@dataclass
class LatentOutput:
    """Result of a latent forward.

    ce: [B] mean CE over each sample's answer tokens (0 for a sample without any).
    n_tokens: [B] number of answer tokens per sample.
    latent_inputs: [B, K, D] the z_t fed at the latent positions (None when K == 0).
    latent_hidden: [B, K, D] the h that produced them (h[s0 + t - 1]); equal to latent_inputs
        without a projector. The ROI alignment loss is taken on these.
    vision_tokens: [T, D] merged vision tokens of the batch's images (packing order).
    logits: [B, S, V] only when asked (tests, evaluation).
    """

    ce: torch.Tensor
    n_tokens: torch.Tensor
    latent_inputs: torch.Tensor | None
    latent_hidden: torch.Tensor | None
    vision_tokens: torch.Tensor | None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class LatentProjector(nn.Module):
    """Optional feedback map z = h + W2 gelu(W1 h); W2 starts at zero so the projector starts
    as the identity and training only moves away from the plain recurrence when it helps."""

    def __init__(self, hidden_size: int, *, expansion: int = 1):
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_size * expansion)
        self.down = nn.Linear(hidden_size * expansion, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Returns h's dtype: the projector may be kept in fp32 beside a bf16 model (it is
        # created in fp32 and loaded that way), and its output is fed back as an input
        # embedding of the model's dtype. Under autocast the linears run in bf16 anyway.
        x = h.to(self.up.weight.dtype)
        return (x + self.down(F.gelu(self.up(x)))).to(h.dtype)


def _feedback(projector: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
    return h if projector is None else projector(h)


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B,S,V] predict labels [B,S] shifted by one; returns (mean CE per sample [B], count [B]).

    Per-sample means (not a token mean over the batch) keep the loss linear in samples, so
    DDP's gradient average over equal per-process batches equals one process on the global batch."""
    tgt = labels[:, 1:]
    lg = logits[:, :-1]
    valid = tgt != -100
    tok = torch.zeros(tgt.shape, dtype=torch.float32, device=logits.device)
    if valid.any():
        tok[valid] = F.cross_entropy(lg[valid].float(), tgt[valid], reduction="none")
    n = valid.sum(dim=1)
    return tok.sum(dim=1) / n.clamp(min=1), n


def _lm_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return unwrap(model).lm_head(h)


def answer_ce(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """per_sample_ce(lm_head(hidden), labels) without the [B, S, V] logits: only the answer
    positions go through the fused lm_head + log-softmax (``medlvr.ops.lm_head_logprobs``)."""
    tgt = labels[:, 1:]
    valid = tgt != -100
    logp = lm_head_logprobs(unwrap(model).lm_head, hidden[:, :-1][valid], tgt[valid])
    tok = torch.zeros(tgt.shape, dtype=torch.float32, device=hidden.device).masked_scatter(valid, -logp)
    n = valid.sum(dim=1)
    return tok.sum(dim=1) / n.clamp(min=1), n


def forward_with_latents(model: nn.Module, batch: Mapping[str, Any], latents: torch.Tensor | None, *,
                         k: int, vis: torch.Tensor | None = None, return_logits: bool = False,
                         return_hidden: bool = False) -> LatentOutput:
    """One full forward with the K latent inputs given.

    latents: [B, K, D] placed at positions s0..s0+K-1 of each sample (K == 0: a plain forward).
    Used for teacher forcing (pooled ROI targets) and by VLPO to re-score rollouts with the z
    they fed back (then ``latent_mu(out.hidden, ...)`` is the current policy's mu).
    """
    hf = unwrap(model)
    ids = batch["input_ids"]
    if vis is None:
        vis = vision_tokens(hf, batch.get("pixel_values"), batch.get("image_grid_thw"))
    emb = embed_inputs(hf, ids, vis)
    B = ids.shape[0]
    if k > 0:
        if latents is None or latents.shape[:2] != (B, k):
            raise ValueError(f"latents: expected shape [{B}, {k}, D], got {None if latents is None else tuple(latents.shape)}")
        s0 = batch["latent_start_index"].to(ids.device)
        cols = s0[:, None] + torch.arange(k, device=ids.device)[None, :]  # [B, K]
        rows = torch.arange(B, device=ids.device)[:, None].expand(B, k)
        emb = emb.index_put((rows, cols), latents.to(emb.dtype))
    pos = positions(hf, batch)
    h = run_decoder(hf, emb, batch["attention_mask"], pos)
    logits = _lm_head(hf, h) if return_logits else None
    ce, n = answer_ce(hf, h, batch["labels"]) if batch.get("labels") is not None else (None, None)
    lh = latent_mu(h, batch["latent_start_index"], k) if k > 0 else None
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=latents if k > 0 else None, latent_hidden=lh,
                        vision_tokens=vis, logits=logits,
                        hidden=h if return_hidden else None)


def latent_mu(hidden: torch.Tensor, latent_start_index: torch.Tensor, k: int) -> torch.Tensor:
    """hidden [B,S,D] -> [B,K,D] with row t = hidden[b, s0_b + t - 1] (the state that produced z_t)."""
    B = hidden.shape[0]
    s0 = latent_start_index.to(hidden.device)
    cols = s0[:, None] - 1 + torch.arange(k, device=hidden.device)[None, :]
    rows = torch.arange(B, device=hidden.device)[:, None].expand(B, k)
    return hidden[rows, cols]


@dataclass
class _Layout:
    """Gather map from the right-padded batch to [left-padded prefix | K latents | right-padded suffix].

    After it every prefix ends in the same column, so the K latent steps are one column each for
    the whole batch and a single DynamicCache serves all samples."""

    index: torch.Tensor  # [B, N] column in the original layout (clamped)
    valid: torch.Tensor  # [B, N] bool
    p: int  # max prefix length (columns before the first latent)


def _layout(attention_mask: torch.Tensor, s0: torch.Tensor, k: int) -> _Layout:
    dev = attention_mask.device
    lengths = attention_mask.long().sum(dim=1)
    if bool((attention_mask.long().cumsum(1) != torch.arange(1, attention_mask.shape[1] + 1, device=dev).clamp(max=lengths[:, None])).any()):
        raise ValueError("attention_mask: recurrent mode expects a right-padded batch (collate(..., padding_side='right'))")
    if bool((s0 < 1).any()) or bool((s0 + k > lengths).any()):
        raise ValueError(f"latent_start_index: expected 1 <= s0 and s0 + K <= length, got s0={s0.tolist()} K={k} lengths={lengths.tolist()}")
    p = int(s0.max())
    s = int((lengths - s0 - k).max())
    j = torch.arange(p + k + s, device=dev)[None, :]
    orig = torch.where(j < p, j - (p - s0[:, None]), s0[:, None] + (j - p))
    valid = (orig >= 0) & (orig < lengths[:, None])
    return _Layout(index=orig.clamp(min=0, max=attention_mask.shape[1] - 1), valid=valid, p=p)


def _gather_cols(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = index.shape[1]
    shape[dim - 1] = index.shape[0]
    idx = index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:])
    return torch.gather(x, dim, idx)


def recurrent_forward(model: nn.Module, batch: Mapping[str, Any], *, k: int,
                      projector: nn.Module | None = None, return_logits: bool = False) -> LatentOutput:
    """Exact latent recurrence with gradients through the whole chain.

    1. prefix forward (up to and including <|latent_start|>) into a DynamicCache;
       z_0 = feedback(h at <|latent_start|>);
    2. for t = 0..K-2 one single-token step feeding z_t at its own mRoPE position, giving h and
       z_{t+1} = feedback(h);
    3. one pass over [z_{K-1}; <|latent_end|> answer] through the cache (the last latent step
       is folded into the suffix pass: same math, one decoder call fewer).
    Cost: about one prefix + K-1 decode steps + one suffix pass, instead of K+1 full passes.
    Positions come from get_rope_index over the whole sequence incl. the <|latent_pad|>
    placeholders, so they equal a single full forward's.
    """
    hf = unwrap(model)
    if k == 0:
        return forward_with_latents(hf, batch, None, k=0, return_logits=return_logits)
    ids, am = batch["input_ids"], batch["attention_mask"]
    s0 = batch["latent_start_index"].to(ids.device)
    lay = _layout(am, s0, k)  # validates the padding before any model work
    vis = vision_tokens(hf, batch.get("pixel_values"), batch.get("image_grid_thw"))
    emb = embed_inputs(hf, ids, vis)
    pos = positions(hf, batch)
    emb = _gather_cols(emb, lay.index, 1) * lay.valid[..., None].to(emb.dtype)
    pos = _gather_cols(pos, lay.index, 2)
    # Pad columns get position 1 (HF's convention for masked slots); they are masked out anyway.
    pos = torch.where(lay.valid[None], pos, torch.ones_like(pos))
    mask = lay.valid.long()
    p = lay.p

    cache = new_cache(hf)
    h_prefix = run_decoder(hf, emb[:, :p], mask[:, :p], pos[:, :, :p], cache)
    h = h_prefix[:, -1]
    hs, zs = [], []
    for t in range(k):
        z = _feedback(projector, h)
        hs.append(h)
        zs.append(z)
        if t == k - 1:
            break
        c = p + t
        h = run_decoder(hf, z[:, None], mask[:, :c + 1], pos[:, :, c:c + 1], cache)[:, -1]
    c = p + k - 1
    tail = torch.cat([zs[-1][:, None].to(emb.dtype), emb[:, c + 1:]], dim=1)
    h_tail = run_decoder(hf, tail, mask, pos[:, :, c:], cache)
    labels = torch.where(lay.valid, _gather_cols(batch["labels"], lay.index, 1), torch.full_like(lay.index, -100))
    # Labels before the suffix are -100 (answer + <|im_end|> only), so the tail's states suffice.
    ce, n = answer_ce(hf, h_tail, labels[:, c:])
    logits = None
    if return_logits:
        # hs[0] is the prefix's last column; hs[1:] are the outputs of the K-1 single steps.
        h_all = torch.cat([h_prefix, *[x[:, None] for x in hs[1:]], h_tail], dim=1)
        logits = _scatter_back(_lm_head(hf, h_all), lay, ids.shape[1])
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=torch.stack(zs, 1), latent_hidden=torch.stack(hs, 1),
                        vision_tokens=vis, logits=logits)


def _scatter_back(x: torch.Tensor, lay: _Layout, s: int) -> torch.Tensor:
    """Inverse of the layout gather for [B, N, V] -> [B, S, V] (pads in the original layout: 0)."""
    out = x.new_zeros(x.shape[0], s, x.shape[-1])
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(lay.index)
    out[rows[lay.valid], lay.index[lay.valid]] = x[lay.valid]
    return out


def coconut_reference(model: nn.Module, batch: Mapping[str, Any], *, k: int,
                      projector: nn.Module | None = None) -> LatentOutput:
    """Coconut-style K+1 full passes: pass t recomputes the whole sequence to read h[s0 + t - 1].

    The executable spec of :func:`recurrent_forward` (tests compare logits and latents)."""
    hf = unwrap(model)
    ids = batch["input_ids"]
    B = ids.shape[0]
    vis = vision_tokens(hf, batch.get("pixel_values"), batch.get("image_grid_thw"))
    emb = embed_inputs(hf, ids, vis)
    pos = positions(hf, batch)
    s0 = batch["latent_start_index"].to(ids.device)
    rows = torch.arange(B, device=ids.device)
    hs, zs = [], []
    for t in range(k):
        h = run_decoder(hf, emb, batch["attention_mask"], pos)[rows, s0 + t - 1]
        z = _feedback(projector, h)
        hs.append(h)
        zs.append(z)
        emb = emb.index_put((rows, s0 + t), z.to(emb.dtype))
    logits = _lm_head(hf, run_decoder(hf, emb, batch["attention_mask"], pos))
    ce, n = per_sample_ce(logits, batch["labels"])
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=torch.stack(zs, 1) if k else None,
                        latent_hidden=torch.stack(hs, 1) if k else None, vision_tokens=vis, logits=logits)


def roi_bins(k: int) -> tuple[int, int]:
    """(gh, gw) with gh * gw = K, as square as possible (gh <= gw): 4 -> (2,2), 8 -> (2,4), 6 -> (2,3)."""
    if k < 1:
        raise ValueError(f"k: expected >= 1 latent steps for ROI bins, got {k}")
    gh = int(math.isqrt(k))
    while k % gh:
        gh -= 1
    return gh, k // gh


def roi_alignment(latent_hidden: torch.Tensor, vis: torch.Tensor, batch: Mapping[str, Any], *,
                  loss: str = "cosine", pooling: str = "area") -> torch.Tensor:
    """Per-sample alignment term [B]: mean over the sample's ROI rows, 0 without an ROI.

    latent_hidden [B,K,D] (the h fed back); row r of the ROI table uses sample roi_sample[r]'s
    latents against image roi_image[r]'s vision tokens, box roi_boxes[r] (resized pixels)."""
    B, K, _ = latent_hidden.shape
    out = latent_hidden.new_zeros(B, dtype=torch.float32)
    boxes = batch.get("roi_boxes")
    if boxes is None or boxes.shape[0] == 0 or vis is None:
        return out
    sample = batch["roi_sample"].to(latent_hidden.device).long()
    geometry = batch.get("roi_geometry")  # from collate: boxes checked once, no device sync in the loss
    if geometry is not None:
        per_row = roi_align_loss(latent_hidden[sample], vis, geometry=geometry.to(vis.device), bins=roi_bins(K),
                            pooling=pooling, loss=loss, reduction="none")
    else:
        per_row = roi_align_loss(latent_hidden[sample], vis, batch["image_grid_thw"], boxes.to(vis.device).float(),
                            batch["roi_image"].to(vis.device).long(), bins=roi_bins(K), pooling=pooling, loss=loss,
                            reduction="none")
    if per_row.dim() > 1:
        per_row = per_row.reshape(per_row.shape[0], -1).mean(dim=1)
    # Per-sample sums as a masked (B, R) sum over rows, not index_add: on CUDA index_add of
    # floats uses atomics, whose order (hence the fp32 rounding) varies from run to run, so
    # the stage-1 term was not deterministic although roi_align_loss is. A reduction over a
    # fixed axis is. R (boxes per batch) is small, so the (B, R) mask costs nothing.
    member = (sample[None, :] == torch.arange(B, device=sample.device)[:, None]).to(torch.float32)
    counts = member.sum(1)
    out = (member * per_row.float()[None, :]).sum(1)
    return out / counts.clamp(min=1)


def pooled_roi_targets(vis: torch.Tensor, batch: Mapping[str, Any], *, k: int, merge: int = 2) -> torch.Tensor:
    """[B, K, D] teacher-forcing inputs: the K area-pooled bins of each sample's FIRST ROI box.

    A sample without an ROI gets the mean vision token of its first image in every slot (the
    least informative target that is still on the visual manifold; chosen over skipping the
    latent slots so that every sample keeps the same sequence layout as at inference); a
    sample without an image gets zeros. Targets are detached: they are inputs, not a path for
    gradients into the vision tower.
    """
    from medlvr.reference.roi_align import roi_pool_targets_ref  # the executable spec of the pooling

    B = batch["input_ids"].shape[0]
    grid = batch["image_grid_thw"]
    counts = (grid.prod(-1) // (merge * merge)).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    v = vis.detach()
    out = v.new_zeros(B, k, v.shape[-1])
    for b, i in enumerate(_first_image_per_sample(batch["mm_token_type_ids"], len(counts))):
        if i >= 0:
            out[b] = v[starts[i]:starts[i + 1]].mean(0)
    boxes = batch.get("roi_boxes")
    if boxes is not None and boxes.shape[0] > 0:
        first_row: dict[int, int] = {}
        for r, b in enumerate(batch["roi_sample"].tolist()):
            first_row.setdefault(b, r)
        rows = torch.tensor(sorted(first_row.values()), dtype=torch.long)
        tg = roi_pool_targets_ref(v, grid, boxes[rows].float(), batch["roi_image"][rows].long(),
                                  bins=roi_bins(k), pooling="area", merge=merge)
        for j, r in enumerate(rows.tolist()):
            out[batch["roi_sample"][r]] = tg[j].to(out.dtype)
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
