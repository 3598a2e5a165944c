"""The plain-HF latent loop: the outside reference of the latent-step engine.

This is the loop as public latent-reasoning code writes it: one HF decoder call per step
over a DynamicCache, feeding the post-norm last hidden state back as ``inputs_embeds``
with explicit positions. ``medlvr.engine.LatentEngine`` must reproduce it (tests/engine),
``medlvr eval`` falls back to it for models the engine has no adapter for, VLPO's
``rollout_backend="hf"`` samples with it, and benchmarks/bench_latent_step.py times it as
``hf_eager``.

Sequence of one row (left-padded prompt ending with <|latent_start|>)::

    prompt ... | z_0 z_1 ... z_{n-1} | [first_token] | a_0 a_1 ...

- z_t = mu_t + sigma * eps_t with mu_t = feedback(h_{t-1}) (``projector``, identity by
  default) and h_{t-1} the post-norm hidden state at sequence position s0 + t - 1, so
  z_0 comes from <|latent_start|>. Every step after the prompt is text-like: all mRoPE
  sections advance by one from the prompt's last position (docs/engine.md).
- exits, per row, after step t on its output h_t (the engine's rules, docs/engine.md):
  "fixed"; "cosine": cos(feedback(h_t), mu_t) > threshold; "stop_logit":
  lm_head(h_t)[latent_end_id] > threshold, or with no threshold, latent_end_id is the
  argmax; "end_distance": ||feedback(h_t) - end_embedding||_2 < threshold (LVR);
  "count": row b runs latent_counts[b] steps (Coconut). exit_scope "batch": every row
  runs until every row's rule has fired once (Mirage). An exited row feeds nothing more: its later latent columns are masked out of
  the attention and its position does not advance.
- tokens: greedy (temperature 0) or sampled with ``medlvr.engine.sampling.sample``
  (top-p nucleus, exponential race) from the same random draws as the engine: the latent
  noise as one (B, K, D) normal tensor in the model dtype first (only when sigma > 0 and
  K > 0), then one (B, V) tensor of Exp(1) variates per sampled token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from medlvr.engine import sampling
from medlvr.engine.request import DEFAULT_COSINE_THRESHOLD, DEFAULT_END_DISTANCE, EXIT_SCOPES, EXITS
from medlvr.models import hf


@dataclass
class LoopOutput:
    """latents (B,K,D) the z_t fed, latent_mu (B,K,D) their means feedback(h_{t-1}),
    latent_hidden (B,K,D) the h_{t-1}, step_hidden (B,K,D) each step's output h_t (all
    zero from a row's exit on), num_latent (B) steps each row ran; tokens (B,T) (pad
    after the stop), token_logprobs (B,T) fp32 under log_softmax(logits / temperature)
    (0 after the stop), text_lengths (B) tokens generated, the stop included, stopped (B),
    logits (B,T,V) fp32 when asked for (0 after the stop)."""

    latents: torch.Tensor
    latent_mu: torch.Tensor
    latent_hidden: torch.Tensor
    step_hidden: torch.Tensor
    num_latent: torch.Tensor
    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    text_lengths: torch.Tensor
    stopped: torch.Tensor
    logits: torch.Tensor | None = None


@torch.no_grad()
def latent_loop(model: torch.nn.Module, prompt: Mapping[str, Any], *, k: int, max_new_tokens: int,
                first_token: int | None = None, exit: str = "fixed", exit_threshold: float | None = None,
                latent_end_id: int | None = None, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                latent_noise_std: float = 0.0, latent_eps: torch.Tensor | None = None, temperature: float = 0.0,
                top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                generator: torch.Generator | None = None, return_logits: bool = False, exit_scope: str = "sample",
                end_embedding: torch.Tensor | None = None,
                latent_counts: Sequence[int] | torch.Tensor | None = None) -> LoopOutput:
    """Prefill -> up to k latent steps -> ``first_token`` (if given) -> up to
    max_new_tokens answer tokens, for a left-padded batch.

    prompt: a model-input batch (input_ids, attention_mask, pixel_values, image_grid_thw,
    mm_token_type_ids) or precomputed ``medlvr.models.hf.prompt_inputs`` (embeds,
    position_ids, attention_mask). latent_eps: (B, K, D) standard-normal draws to use
    instead of drawing them from ``generator``.
    """
    if exit not in EXITS:
        raise ValueError(f"exit must be one of {EXITS}, got {exit!r}")
    if exit == "stop_logit" and latent_end_id is None:
        raise ValueError("exit='stop_logit' needs latent_end_id")
    if exit == "end_distance" and not isinstance(end_embedding, torch.Tensor):
        raise ValueError("exit='end_distance' needs end_embedding, a (D,) tensor")
    if exit == "count" and latent_counts is None:
        raise ValueError("exit='count' needs latent_counts, one step count per row")
    if exit_scope not in EXIT_SCOPES:
        raise ValueError(f"exit_scope must be one of {EXIT_SCOPES}, got {exit_scope!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    model = hf.unwrap(model)
    p = prompt if "embeds" in prompt else hf.prompt_inputs(model, prompt)
    emb, pos, mask = p["embeds"], p["position_ids"], p["attention_mask"]
    B, _, D = emb.shape
    dev, dt = emb.device, emb.dtype
    feedback = projector if projector is not None else (lambda x: x)
    embed, head = model.get_input_embeddings(), model.lm_head
    cache = hf.new_cache(model)
    h = hf.run_decoder(model, emb, mask, pos, cache)[:, -1]
    nxt = pos[..., -1:] + 1  # [3,B,1] (mRoPE) or [B,1]: text-like from here on

    def step(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed x [B,D] at each active row's next position; inactive rows add a masked column."""
        nonlocal mask, nxt
        mask = torch.cat([mask, active[:, None].to(mask.dtype)], dim=1)
        out = hf.run_decoder(model, x[:, None].to(dt), mask, nxt, cache)[:, -1]
        nxt = nxt + active[:, None].long()
        return out

    # ---------------------------------------------------------------- latent segment
    zeros = torch.zeros(B, k, D, dtype=dt, device=dev)
    latents, mus, hidden, outs = zeros, zeros.clone(), zeros.clone(), zeros.clone()
    num_latent = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    if exit == "count":
        counts = torch.as_tensor(latent_counts, dtype=torch.long, device=dev)
        active = counts > 0
    fired = torch.zeros(B, dtype=torch.bool, device=dev)
    sigma = float(latent_noise_std)
    noisy = sigma > 0 and k > 0
    eps = latent_eps
    if noisy and eps is None:
        eps = torch.empty(B, k, D, dtype=dt, device=dev).normal_(generator=generator)
    mu = feedback(h)
    for t in range(k):
        z = (mu.float() + sigma * eps[:, t].float()).to(dt) if noisy else mu.to(dt)
        keep = active[:, None]
        latents[:, t], mus[:, t], hidden[:, t] = (torch.where(keep, v.to(dt), 0) for v in (z, mu, h))
        num_latent += active.long()
        h = torch.where(keep, step(z, active), h)
        outs[:, t] = torch.where(keep, h, 0)
        mu_next = feedback(h)
        if exit == "cosine":
            thr = DEFAULT_COSINE_THRESHOLD if exit_threshold is None else exit_threshold
            stop = F.cosine_similarity(mu_next.float(), mu.float(), dim=-1) > thr
        elif exit == "stop_logit":
            logits = head(h).float()
            stop = (logits.argmax(-1) == latent_end_id if exit_threshold is None
                    else logits[:, latent_end_id] > exit_threshold)
        elif exit == "end_distance":
            thr = DEFAULT_END_DISTANCE if exit_threshold is None else exit_threshold
            stop = (mu_next.float() - end_embedding.float()).norm(dim=-1) < thr
        elif exit == "count":
            stop = num_latent >= counts
        else:
            stop = torch.zeros_like(active)
        mu = torch.where(keep, mu_next, mu)
        if exit_scope == "batch" and exit != "fixed":
            fired = fired | (stop & active)
            active = active & ~fired.all()
        else:
            active = active & ~stop

    # ---------------------------------------------------------------- answer
    T = max_new_tokens
    live = torch.ones(B, dtype=torch.bool, device=dev)
    if first_token is not None and T > 0:
        h = step(embed(torch.full((B,), first_token, dtype=torch.long, device=dev)), live)
    greedy = temperature == 0
    temp = torch.tensor(float(temperature) if not greedy else 1.0, device=dev)
    nucleus = torch.tensor(float(top_p), device=dev) if not greedy and top_p < 1 else None
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros(B, T, dtype=torch.float32, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    logits_out = torch.zeros(B, T, head.out_features, dtype=torch.float32, device=dev) if return_logits else None
    for j in range(T):
        logits = head(h).float()
        noise = None if greedy else torch.empty_like(logits).exponential_(generator=generator)
        tok, lp = sampling.sample(logits, greedy=greedy, temperature=temp, top_p=nucleus, noise=noise)
        tokens[:, j] = torch.where(live, tok, pad_id)
        logps[:, j] = torch.where(live, lp, 0.0)
        if logits_out is not None:
            logits_out[:, j] = torch.where(live[:, None], logits, 0.0)
        lengths += live.long()
        hit = live & (tok[:, None] == stops[None, :]).any(-1)
        stopped |= hit
        live = live & ~hit
        if not bool(live.any()) or j == T - 1:
            break
        h = step(embed(tokens[:, j]), live)
    return LoopOutput(latents=latents, latent_mu=mus, latent_hidden=hidden, step_hidden=outs, num_latent=num_latent,
                      tokens=tokens, token_logprobs=logps, text_lengths=lengths, stopped=stopped, logits=logits_out)
