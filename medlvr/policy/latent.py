"""Latent-segment forward passes of a Qwen2.5-VL model: the training-side math of MedLVR.

Shared by stage 1 (``medlvr.train.sft.objective``) and stage 2 (``medlvr.train.vlpo.objective``). Everything
here works on one collated batch (``medlvr.data.collate.Batch``) and an HF
``Qwen2_5_VLForConditionalGeneration`` (possibly wrapped by peft / DDP / FSDP).

Columns of every sample (``P = batch.latent_start``, the first <|latent_pad|>; collate's layout)::

    [0, P)             prefix, left-padded: chat header, image tokens, question, ends with
                       <|latent_start|> in column P - 1
    [P, P + K)         K latent positions (input_ids hold <|latent_pad|> so that get_rope_index
                       gives them text positions +1 per step; their EMBEDDINGS are replaced)
    [P + K, S)         suffix, right-padded: <|latent_end|> answer <|im_end|>

get_rope_index numbers each row's real (mask 1) tokens in order and gives pads position 0, so
the positions of a row's real tokens do not depend on where its padding is. Left-pad query
rows see no key; their outputs are never read (labels -100), and they carry no gradient.

The shift (binding, also for VLPO): the input fed at latent column P + t is
``z_t = feedback(h[P + t - 1])`` where h is the post-final-norm last hidden state, so
``z_0 = feedback(h at <|latent_start|>)``. ``mu_t`` (VLPO) is the current policy's h at the same
column P + t - 1: :func:`latent_mu` takes it from a full forward.

Public functions (shapes: B samples, S sequence, K latent steps, D hidden, T vision tokens):

- :func:`recurrent_forward` — exact latent recurrence: the prefix forward, then single-token
  steps through a gradient-carrying DynamicCache, then the suffix in one pass. Returns
  per-sample CE and the latent states. Equal (fp32) to :func:`coconut_reference`, K+1 full passes.
- :func:`forward_with_latents` — ONE full forward with the K latent inputs given (teacher
  forcing with pooled ROI targets; VLPO re-scoring of rollouts with their fed-back z).
- the layout check and the shift (:func:`latent_start`, :func:`latent_mu`) are medlvr/policy/batch.py.
- the pieces (vision tokens, embeddings, positions, the decoder call) come from medlvr/models/hf.py.
- :func:`per_sample_ce` — CE averaged over each sample's answer tokens ([B]), from logits (the
  reference); :func:`answer_ce` — the same from hidden states via the fused lm_head log-prob op.
- the lm_head choice (fused op or the head's own forward) is medlvr/policy/head.py;
  stage 1's ROI supervision (alignment term, pooled targets) is medlvr/train/sft/roi.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlvr.models.hf import embed_inputs, new_cache, positions, run_decoder, unwrap, vision_tokens
from medlvr.ops.fused_logprobs import fused_linear_cross_entropy, lm_head_logprobs
from medlvr.policy.batch import Batch, latent_mu, latent_start
from medlvr.policy.head import through_head

__all__ = [
    "LatentOutput",
    "LatentProjector",
    "forward_with_latents",
    "recurrent_forward",
    "coconut_reference",
    "per_sample_ce",
    "answer_ce",
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
    ce_mean: ce.mean() as the training loss takes it, when asked (``ce_mean=True``): then it
        carries the gradient, computed in the forward by the fused cross-entropy, and ce is
        detached.
    """

    ce: torch.Tensor
    n_tokens: torch.Tensor
    latent_inputs: torch.Tensor | None
    latent_hidden: torch.Tensor | None
    vision_tokens: torch.Tensor | None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    ce_mean: torch.Tensor | None = None


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


def answer_ce(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, mean: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """per_sample_ce(lm_head(hidden), labels) without the [B, S, V] logits -> (ce [B], n [B], ce_mean).

    Only the answer positions go through the lm_head. ``mean=False``: ce is differentiable per
    sample (``medlvr.ops.lm_head_logprobs``: its backward recomputes the logits, 4 GEMMs) and
    ce_mean is None. ``mean=True`` (the training loss): ce_mean = ce.mean() is one scalar whose
    gradients are computed in the forward by ``medlvr.ops.fused_linear_cross_entropy`` with
    per-token weights 1 / (B n_b) (3 GEMMs), and ce comes back detached, for logging; an
    lm_head that is not a plain nn.Linear runs unfused, ce_mean = ce.mean() by autograd."""
    tgt = labels[:, 1:]
    valid = tgt != -100
    n = valid.sum(dim=1)
    head = unwrap(model).lm_head
    h, t = hidden[:, :-1][valid], tgt[valid]
    tok = torch.zeros(tgt.shape, dtype=torch.float32, device=hidden.device)

    def per_sample(logp: torch.Tensor) -> torch.Tensor:
        return tok.masked_scatter(valid, -logp).sum(dim=1) / n.clamp(min=1)

    if not mean:
        return per_sample(lm_head_logprobs(head, h, t)), n, None
    weights = 1.0 / (tgt.shape[0] * n[:, None].expand_as(tgt)[valid].float())

    def fused(weight, bias, x):
        ce_mean, logp = fused_linear_cross_entropy(x, weight, t, bias=bias, reduction="sum", weights=weights,
                                                   return_logprobs=True)
        return per_sample(logp), ce_mean

    def unfused(lm_head, x):
        ce = per_sample(lm_head_logprobs(lm_head, x, t))
        return ce, ce.mean()

    ce, ce_mean = through_head(head, h, fused=fused, unfused=unfused)
    return ce, n, ce_mean


def forward_with_latents(model: nn.Module, batch: Batch, latents: torch.Tensor | None, *,
                         k: int, vis: torch.Tensor | None = None, return_logits: bool = False,
                         return_hidden: bool = False, ce_mean: bool = False) -> LatentOutput:
    """One full forward with the K latent inputs given.

    latents: [B, K, D] placed in columns P..P+K-1 (P = batch.latent_start; K == 0: a plain
    forward). Used for teacher forcing (pooled ROI targets) and by VLPO to re-score rollouts
    with the z they fed back (then ``latent_mu(out.hidden, P, K)`` is the current policy's mu).
    ce_mean: the training loss form (:func:`answer_ce` with mean=True: out.ce_mean carries the
    gradient, out.ce is detached).
    """
    base = unwrap(model)
    ids = batch.input_ids
    B = ids.shape[0]
    p = latent_start(batch, k) if k > 0 else 0
    if k > 0 and (latents is None or latents.shape[:2] != (B, k)):
        got = None if latents is None else tuple(latents.shape)
        raise ValueError(f"latents: expected shape [{B}, {k}, D], got {got}")
    if vis is None:
        vis = vision_tokens(base, batch.pixel_values, batch.image_grid_thw)
    emb = embed_inputs(base, ids, vis)
    if k > 0:
        emb = torch.cat([emb[:, :p], latents.to(emb.dtype), emb[:, p + k:]], dim=1)
    pos = positions(base, batch.model_inputs())
    h = run_decoder(base, emb, batch.attention_mask, pos)
    logits = _lm_head(base, h) if return_logits else None
    ce, n, mean = (answer_ce(base, h, batch.labels, mean=ce_mean) if batch.labels is not None
                   else (None, None, None))
    lh = latent_mu(h, p, k) if k > 0 else None
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=latents if k > 0 else None, latent_hidden=lh,
                        vision_tokens=vis, logits=logits, hidden=h if return_hidden else None, ce_mean=mean)


def recurrent_forward(model: nn.Module, batch: Batch, *, k: int,
                      projector: nn.Module | None = None, return_logits: bool = False,
                      ce_mean: bool = False) -> LatentOutput:
    """Exact latent recurrence with gradients through the whole chain.

    1. prefix forward (columns [:P], up to and including <|latent_start|>) into a
       DynamicCache; z_0 = feedback(h at <|latent_start|>);
    2. for t = 0..K-2 one single-token step feeding z_t at its own mRoPE position, giving h and
       z_{t+1} = feedback(h);
    3. one pass over [z_{K-1}; <|latent_end|> answer] through the cache (the last latent step
       is folded into the suffix pass: same math, one decoder call fewer).
    collate's layout puts every prefix's end in the same column P, so each latent step is one
    column for the whole batch and one DynamicCache serves all samples.
    Cost: about one prefix + K-1 decode steps + one suffix pass, instead of K+1 full passes.
    Positions come from get_rope_index over the whole sequence incl. the <|latent_pad|>
    placeholders, so they equal a single full forward's. ce_mean: as forward_with_latents.
    """
    base = unwrap(model)
    if k == 0:
        return forward_with_latents(base, batch, None, k=0, return_logits=return_logits, ce_mean=ce_mean)
    p = latent_start(batch, k)  # validates the layout before any model work
    mask = batch.attention_mask
    vis = vision_tokens(base, batch.pixel_values, batch.image_grid_thw)
    emb = embed_inputs(base, batch.input_ids, vis)
    pos = positions(base, batch.model_inputs())

    cache = new_cache(base)
    h_prefix = run_decoder(base, emb[:, :p], mask[:, :p], pos[..., :p], cache)
    h = h_prefix[:, -1]
    hs, zs = [], []
    for t in range(k):
        z = _feedback(projector, h)
        hs.append(h)
        zs.append(z)
        if t == k - 1:
            break
        c = p + t
        h = run_decoder(base, z[:, None], mask[:, :c + 1], pos[..., c:c + 1], cache)[:, -1]
    c = p + k - 1
    tail = torch.cat([zs[-1][:, None].to(emb.dtype), emb[:, c + 1:]], dim=1)
    h_tail = run_decoder(base, tail, mask, pos[..., c:], cache)
    # Labels before the suffix are -100 (answer + <|im_end|> only), so the tail's states suffice.
    ce, n, mean = answer_ce(base, h_tail, batch.labels[:, c:], mean=ce_mean)
    logits = None
    if return_logits:
        # hs[0] is the prefix's last column; hs[1:] are the outputs of the K-1 single steps.
        h_all = torch.cat([h_prefix, *[x[:, None] for x in hs[1:]], h_tail], dim=1)
        logits = _lm_head(base, h_all)
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=torch.stack(zs, 1), latent_hidden=torch.stack(hs, 1),
                        vision_tokens=vis, logits=logits, ce_mean=mean)


def coconut_reference(model: nn.Module, batch: Batch, *, k: int,
                      projector: nn.Module | None = None) -> LatentOutput:
    """Coconut-style K+1 full passes: pass t recomputes the whole sequence to read h[P + t - 1].

    The executable spec of :func:`recurrent_forward` (tests compare logits and latents)."""
    base = unwrap(model)
    ids = batch.input_ids
    vis = vision_tokens(base, batch.pixel_values, batch.image_grid_thw)
    emb = embed_inputs(base, ids, vis)
    pos = positions(base, batch.model_inputs())
    p = batch.latent_start
    hs, zs = [], []
    for t in range(k):
        h = run_decoder(base, emb, batch.attention_mask, pos)[:, p + t - 1]
        z = _feedback(projector, h)
        hs.append(h)
        zs.append(z)
        emb = torch.cat([emb[:, :p + t], z[:, None].to(emb.dtype), emb[:, p + t + 1:]], dim=1)
    logits = _lm_head(base, run_decoder(base, emb, batch.attention_mask, pos))
    ce, n = per_sample_ce(logits, batch.labels)
    return LatentOutput(ce=ce, n_tokens=n, latent_inputs=torch.stack(zs, 1) if k else None,
                        latent_hidden=torch.stack(hs, 1) if k else None, vision_tokens=vis, logits=logits)
