"""The plain-HF latent loop: a production backend, and the latent-step engine's outside
oracle.

This is the loop as public latent-reasoning code writes it: one HF decoder call per step
over a DynamicCache, feeding the post-norm last hidden state back as ``inputs_embeds``
with explicit positions. ``medlvr eval`` runs it as its "hf" backend (and for models the
engine has no adapter for), VLPO's ``rollout_backend="hf"`` samples with it, the latent
ablation runs on it, ``medlvr.engine.LatentEngine`` must reproduce it (tests/engine), and
benchmarks/bench_latent_step.py times it as ``hf_eager``. Its spec is the cacheless loop
of medlvr/reference/latent_loop.py (the whole decoder again at every step, fixed K, greedy),
checked against it by tests/engine/test_hf_loop_spec.py.

Sequence of one row (left-padded prompt ending with <|latent_start|>)::

    prompt ... | z_0 z_1 ... z_{n-1} | [first_token] | a_0 a_1 ...

- z_t = mu_t + sigma * eps_t with mu_t = feedback(h_{t-1}) (``projector``, identity by
  default) and h_{t-1} the post-norm hidden state at sequence position s0 + t - 1, so
  z_0 comes from <|latent_start|>. Every step after the prompt is text-like: all mRoPE
  sections advance by one from the prompt's last position (docs/engine.md).
- exits: the rules of medlvr/engine/exit_rules.py (their stop tests are shared with
  the engine: this loop checks the engine's layout, positions, cache and feedback, not the
  rules' definitions, which tests/dropin/test_presets.py checks against the original
  systems' loops). An exited row feeds nothing more: its later latent columns are masked
  out of the attention and its position does not advance. After the segment the answer
  starts from ``first_token`` (after_exit "end_token"; None: sampled from each row's last
  hidden state, "model") or from the per-row tokens of after_exit "mirage".
- tokens: greedy (temperature 0) or sampled with ``medlvr.engine.sampling.sample``
  (top-p nucleus, exponential race) from the same random draws as the engine: the latent
  noise as one (B, K, D) normal tensor in the model dtype first (only when sigma > 0 and
  K > 0), then one (B, V) tensor of Exp(1) variates per sampled token.
- repetition_penalty: HF's, before temperature / top-p, over each row's ids so far: the
  prompt's input_ids where attention_mask is 1, then every token fed (the first token,
  Mirage's per-row tokens, each answer token); latent steps have no id and count nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from medlvr.models import hf
from medlvr.engine import exit_rules, sampling
from medlvr.engine.request import check_repetition_penalty
from medlvr.engine.state import penalty_inverse


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
                latent_counts: Sequence[int] | torch.Tensor | None = None, exit_distance: str = "mse",
                exit_distance_on: str = "fed", exit_check_start: bool = False, after_exit: str = "end_token",
                latent_pad_id: int | None = None, stop_first: bool = True,
                repetition_penalty: float = 1.0) -> LoopOutput:
    """Prefill -> up to k latent steps -> ``first_token`` (if given) -> up to
    max_new_tokens answer tokens, for a left-padded batch.

    prompt: a model-input batch (input_ids, attention_mask, pixel_values, image_grid_thw,
    mm_token_type_ids) or precomputed ``medlvr.models.hf.prompt_inputs`` (embeds,
    position_ids, attention_mask). latent_eps: (B, K, D) standard-normal draws to use
    instead of drawing them from ``generator``. The exit arguments are those of
    medlvr/engine/exit_rules.py; stop_first=False: the first answer token never stops a
    row (Coconut). repetition_penalty: see the module docstring; it needs the prompt's
    input_ids (a model-input batch, or prompt_inputs with "input_ids").
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    penalty = check_repetition_penalty(repetition_penalty)
    if penalty != 1.0 and prompt.get("input_ids") is None:
        raise ValueError("repetition_penalty needs the prompt's input_ids (the ids it penalises)")
    model = hf.unwrap(model)
    dec = _Decoder(model, prompt if "embeds" in prompt else hf.prompt_inputs(model, prompt))
    embed, head = model.get_input_embeddings(), model.lm_head
    rule = exit_rules.checked(k, exit=exit, exit_threshold=exit_threshold, exit_scope=exit_scope,
                              exit_distance=exit_distance, exit_distance_on=exit_distance_on,
                              exit_check_start=exit_check_start, after_exit=after_exit, latent_end_id=latent_end_id,
                              latent_pad_id=latent_pad_id, end_embedding=end_embedding, latent_counts=latent_counts,
                              batch=dec.batch, vocab=head.out_features)
    feedback = projector if projector is not None else (lambda x: x)
    seg = _latent_segment(dec, rule, k=k, feedback=feedback, lm_head=head, latent_end_id=latent_end_id,
                          sigma=float(latent_noise_std), eps=latent_eps, generator=generator)
    # ---------------------------------------------------------------- answer
    h, live = seg.h, torch.ones(dec.batch, dtype=torch.bool, device=dec.device)
    seen = _Seen(prompt, head.out_features, dec.device) if penalty != 1.0 else None
    fed = None
    if rule.after == "mirage" and max_new_tokens > 0:
        fed = seg.after
    elif first_token is not None and max_new_tokens > 0:
        fed = torch.full((dec.batch,), first_token, dtype=torch.long, device=dec.device)
    if fed is not None:
        h = dec.step(embed(fed), live)
        if seen is not None:
            seen.add(fed, live)
    return _answer(dec, seg, h, embed=embed, lm_head=head, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, stop_ids=stop_ids, pad_id=pad_id, generator=generator, return_logits=return_logits,
                   stop_first=stop_first, penalty=penalty, seen=seen)


class _Seen:
    """The ids in each row's sequence so far, as a (B, V + 1) bool mask (HF's
    RepetitionPenaltyLogitsProcessor reads input_ids, left padding excluded; column V absorbs
    padding and ids past lm_head's vocabulary)."""

    def __init__(self, prompt: Mapping[str, Any], vocab: int, device: torch.device):
        ids, mask = prompt["input_ids"].to(device), prompt.get("attention_mask")
        mask = None if mask is None else mask.to(device)
        ids = ids if mask is None else ids.masked_fill(mask == 0, vocab)
        self.mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
        self.mask.scatter_(1, ids.clamp(max=vocab), True)
        self.vocab = vocab

    def add(self, tokens: torch.Tensor, live: torch.Tensor) -> None:
        self.mask.scatter_(1, torch.where(live, tokens, self.vocab)[:, None], True)

    def ids(self) -> torch.Tensor:
        return self.mask[:, :self.vocab]


class _Decoder:
    """The HF decoder over a DynamicCache after the prompt's prefill: ``h`` the post-norm
    hidden state of each row's last prompt position; ``step`` feeds one column."""

    def __init__(self, model: torch.nn.Module, p: Mapping[str, Any]):
        emb, pos, self.mask = p["embeds"], p["position_ids"], p["attention_mask"]
        self.model, self.cache = model, hf.new_cache(model)
        self.batch, _, self.hidden_size = emb.shape
        self.device, self.dtype = emb.device, emb.dtype
        self.h = hf.run_decoder(model, emb, self.mask, pos, self.cache)[:, -1]
        self.next_pos = pos[..., -1:] + 1  # [3,B,1] (mRoPE) or [B,1]: text-like from here on

    def step(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed x [B,D] at each active row's next position; inactive rows add a masked column."""
        self.mask = torch.cat([self.mask, active[:, None].to(self.mask.dtype)], dim=1)
        out = hf.run_decoder(self.model, x[:, None].to(self.dtype), self.mask, self.next_pos, self.cache)[:, -1]
        self.next_pos = self.next_pos + active[:, None].long()
        return out


@dataclass
class _Segment:
    """The latent segment's columns (LoopOutput's latents, latent_mu, latent_hidden,
    step_hidden, num_latent), the hidden state the answer starts from and the per-row
    tokens after_exit "mirage" feeds."""

    latents: torch.Tensor
    mus: torch.Tensor
    hidden: torch.Tensor
    outs: torch.Tensor
    num_latent: torch.Tensor
    h: torch.Tensor
    after: torch.Tensor


def _latent_segment(dec: _Decoder, rule: exit_rules.ExitRule, *, k: int, feedback, lm_head, latent_end_id,
                    sigma: float, eps: torch.Tensor | None, generator: torch.Generator | None) -> _Segment:
    """Up to k latent steps from the prompt's last hidden state; a row stops feeding at its exit."""
    B, D, dev, dt = dec.batch, dec.hidden_size, dec.device, dec.dtype
    zeros = torch.zeros(B, k, D, dtype=dt, device=dev)
    latents, mus, hidden, outs = zeros, zeros.clone(), zeros.clone(), zeros.clone()
    num_latent = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    counts = None
    if rule.counts is not None:
        counts = torch.tensor(rule.counts, dtype=torch.long, device=dev)
        active = counts > 0
    buffers = dict(threshold=torch.tensor(rule.threshold, device=dev), lm_head=lm_head, counts=counts,
                   end_id=None if latent_end_id is None else torch.tensor([latent_end_id], device=dev),
                   end_embedding=rule.end_embedding)
    fired = torch.zeros((), dtype=torch.long, device=dev)
    after = torch.full((B,), latent_end_id if latent_end_id is not None else 0, dtype=torch.long, device=dev)

    def exit_test(**inputs) -> None:
        nonlocal active, after
        stop, tok = exit_rules.stop_mask(rule, num_latent=num_latent, **inputs, **buffers)
        if stop is None:
            return
        if rule.scope == "batch":
            exits, first = exit_rules.batch_exit(stop, active, fired, torch.tensor(B, device=dev))
            if rule.after == "mirage":
                pad = torch.tensor([rule.latent_pad_id], device=dev)
                after = torch.where(exits & active, exit_rules.mirage_after_tokens(tok, stop, first, buffers["end_id"],
                                                                                   pad), after)
            active = active & ~exits
        else:
            active = active & ~stop

    noisy = sigma > 0 and k > 0
    if noisy and eps is None:
        eps = torch.empty(B, k, D, dtype=dt, device=dev).normal_(generator=generator)
    h = dec.h
    mu = feedback(h)
    if rule.check_start:
        exit_test(fed=None, mu=None, mu_next=None, h=h)
    for t in range(k):
        c = torch.promote_types(dt, torch.float32)  # fp32 math, fp64 for an fp64 model (as the engine)
        z = (mu.to(c) + sigma * eps[:, t].to(c)).to(dt) if noisy else mu.to(dt)
        keep = active[:, None]
        latents[:, t], mus[:, t], hidden[:, t] = (torch.where(keep, v.to(dt), 0) for v in (z, mu, h))
        num_latent += active.long()
        h = torch.where(keep, dec.step(z, active), h)
        outs[:, t] = torch.where(keep, h, 0)
        mu_next = feedback(h)
        exit_test(fed=latents[:, t], mu=mu, mu_next=mu_next, h=h)
        mu = torch.where(keep, mu_next, mu)
    return _Segment(latents, mus, hidden, outs, num_latent, h, after)


def _answer(dec: _Decoder, seg: _Segment, h: torch.Tensor, *, embed, lm_head, max_new_tokens: int,
            temperature: float, top_p: float, stop_ids: Sequence[int], pad_id: int,
            generator: torch.Generator | None, return_logits: bool, stop_first: bool, penalty: float = 1.0,
            seen: _Seen | None = None) -> LoopOutput:
    """Up to max_new_tokens answer tokens from ``h``; a row stops after a stop id. seen: the
    rows' ids so far, which the repetition ``penalty`` reads (None when it is 1)."""
    B, T, dev = dec.batch, max_new_tokens, dec.device
    live = torch.ones(B, dtype=torch.bool, device=dev)
    greedy = temperature == 0
    temp = torch.tensor(float(temperature) if not greedy else 1.0, device=dev)
    nucleus = torch.tensor(float(top_p), device=dev) if not greedy and top_p < 1 else None
    pen = torch.tensor(penalty, dtype=torch.float32, device=dev) if seen is not None else None  # as the engine's
    inv = (torch.tensor(penalty_inverse(penalty), dtype=torch.float32, device=dev)  # on CUDA: what HF computes
           if seen is not None and dev.type == "cuda" else None)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros(B, T, dtype=torch.float32, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    logits_out = torch.zeros(B, T, lm_head.out_features, dtype=torch.float32, device=dev) if return_logits else None
    for j in range(T):
        logits = lm_head(h).float()
        noise = None if greedy else torch.empty_like(logits).exponential_(generator=generator)
        tok, lp = sampling.sample(logits, greedy=greedy, temperature=temp, top_p=nucleus, noise=noise, penalty=pen,
                                  seen=None if seen is None else seen.ids(), penalty_inverse=inv)
        tokens[:, j] = torch.where(live, tok, pad_id)
        logps[:, j] = torch.where(live, lp, 0.0)
        if logits_out is not None:
            logits_out[:, j] = torch.where(live[:, None], logits, 0.0)
        lengths += live.long()
        hit = live & (tok[:, None] == stops[None, :]).any(-1) & (stop_first or j > 0)
        stopped |= hit
        live = live & ~hit
        if not bool(live.any()) or j == T - 1:
            break
        h = dec.step(embed(tokens[:, j]), live)
        if seen is not None:
            seen.add(tokens[:, j], live)
    return LoopOutput(latents=seg.latents, latent_mu=seg.mus, latent_hidden=seg.hidden, step_hidden=seg.outs,
                      num_latent=seg.num_latent, tokens=tokens, token_logprobs=logps, text_lengths=lengths,
                      stopped=stopped, logits=logits_out)
