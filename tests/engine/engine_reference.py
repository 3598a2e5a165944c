"""The engine's outside reference, per sample: medlvr/engine/hf_loop.py (the latent
loop as public latent-reasoning codebases write it: an HF forward per step over a
DynamicCache, feeding the post-norm last hidden state back as ``inputs_embeds`` with
explicit position ids), unpacked into per-step lists. The engine must reproduce it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine_models import IMAGE
from medlvr.engine.hf_loop import latent_loop


@dataclass
class RefResult:
    latents: list = field(default_factory=list)  # z_t fed at step t, each (D,)
    hidden: list = field(default_factory=list)  # h_{t-1}, the post-norm hidden that gave z_t
    cosines: list = field(default_factory=list)  # cos(z_{t+1}, z_t) after step t
    end_logits: list = field(default_factory=list)  # lm_head(h_t)[latent_end] after step t
    end_is_argmax: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)  # (V,) per answer token


@torch.no_grad()
def hf_latent_loop(model, ids, pv=None, grid=None, *, k_max, exit="fixed", threshold=None, latent_end_id=None,
                   max_new_tokens=0, stop_ids=(), projector=None, noise=None) -> RefResult:
    """One unpadded sample through medlvr/engine/hf_loop.py, as per-step lists."""
    batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None]),
             "mm_token_type_ids": (ids == IMAGE).int()[None]}
    if pv is not None:
        batch.update(pixel_values=pv, image_grid_thw=grid)
    out = latent_loop(model, batch, k=k_max, max_new_tokens=max_new_tokens, exit=exit, exit_threshold=threshold,
                      latent_end_id=latent_end_id, first_token=latent_end_id if k_max > 0 else None,
                      projector=projector, stop_ids=stop_ids, return_logits=True,
                      latent_noise_std=1.0 if noise is not None else 0.0,
                      latent_eps=None if noise is None else noise[None])
    feed = projector if projector is not None else (lambda x: x)
    res = RefResult()
    for t in range(int(out.num_latent[0])):
        h = out.step_hidden[0, t]
        res.latents.append(out.latents[0, t])
        res.hidden.append(out.latent_hidden[0, t])
        res.cosines.append(F.cosine_similarity(feed(h), out.latent_mu[0, t], dim=0).item())
        if latent_end_id is not None:
            logits = model.lm_head(h)
            res.end_logits.append(logits[latent_end_id].item())
            res.end_is_argmax.append(int(logits.argmax()) == latent_end_id)
    m = int(out.text_lengths[0])
    res.tokens = out.tokens[0, :m].tolist()
    res.logits = list(out.logits[0, :m])
    return res
