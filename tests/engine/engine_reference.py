"""The latent loop as public latent-reasoning codebases write it, batch 1: an HF
forward per step over a DynamicCache, feeding the post-norm last hidden state back as
``inputs_embeds`` with explicit position ids. The engine must reproduce it."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine_models import IMAGE


@dataclass
class RefResult:
    latents: list = field(default_factory=list)  # z_t fed at step t, each (D,)
    hidden: list = field(default_factory=list)  # h_{t-1}, the post-norm hidden that gave z_t
    cosines: list = field(default_factory=list)  # cos(z_{t+1}, z_t) after step t
    end_logits: list = field(default_factory=list)  # lm_head(h_t)[latent_end] after step t
    end_is_argmax: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)  # (V,) per answer token


def _cache_kw(module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def hf_latent_loop(model, ids, pv=None, grid=None, *, k_max, exit="fixed", threshold=None, latent_end_id=None,
                   max_new_tokens=0, stop_ids=(), projector=None, noise=None) -> RefResult:
    vl = hasattr(model.model, "language_model")
    decoder = model.model
    kw = dict(input_ids=ids[None], use_cache=True)
    if vl:
        kw["mm_token_type_ids"] = (ids == IMAGE).int()[None]
        if pv is not None:
            kw.update(pixel_values=pv, image_grid_thw=grid)
    out = decoder(**kw)
    cache = _out_cache(out)
    delta = int(decoder.rope_deltas.reshape(-1)[0]) if vl and pv is not None else 0
    seq = ids.numel()
    ckw = _cache_kw(decoder)

    def step(embeds):
        nonlocal seq
        p = torch.tensor([[seq + delta]], device=ids.device)
        pos = p[None].expand(3, 1, 1) if vl else p
        o = decoder(inputs_embeds=embeds.reshape(1, 1, -1), position_ids=pos, use_cache=True, **{ckw: cache})
        seq += 1
        return o.last_hidden_state[0, -1]

    res = RefResult()
    feed = projector if projector is not None else (lambda x: x)
    h = out.last_hidden_state[0, -1]
    for t in range(k_max):
        mu = feed(h)
        z = mu if noise is None else mu + noise[t]  # VLPO exploration: z_t = mu_t + sigma eps_t
        res.latents.append(z)
        res.hidden.append(h)
        h = step(z)
        cos = F.cosine_similarity(feed(h), mu, dim=0).item()
        logits = model.lm_head(h)
        res.cosines.append(cos)
        if latent_end_id is not None:
            res.end_logits.append(logits[latent_end_id].item())
            res.end_is_argmax.append(int(logits.argmax()) == latent_end_id)
        if exit == "cosine" and cos > threshold:
            break
        if exit == "stop_logit" and (res.end_is_argmax[-1] if threshold is None else res.end_logits[-1] > threshold):
            break
    embed = model.get_input_embeddings()
    if max_new_tokens == 0:
        return res
    logits = model.lm_head(step(embed(torch.tensor(latent_end_id, device=ids.device))) if k_max > 0 else h)
    for i in range(max_new_tokens):
        tok = int(logits.argmax())
        res.tokens.append(tok)
        res.logits.append(logits)
        if tok in stop_ids or i == max_new_tokens - 1:
            break
        logits = model.lm_head(step(embed(torch.tensor(tok, device=ids.device))))
    return res
