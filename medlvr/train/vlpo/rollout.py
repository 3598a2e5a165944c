"""VLPO rollouts and the teacher-forced policy forward over them.

Sequence of one rollout (docs/vlpo.md):

    [prompt ... <|latent_start|>] [z_0 .. z_{K-1}] [<|latent_end|>] [a_0 .. a_{T-1}]
     index 0 .. s0-1               s0 .. s0+K-1     s0+K              s0+K+1 ..

The prompt is left-padded and ends with <|latent_start|>, so s0 (the index of the first
<|latent_pad|>) equals the padded prompt length P for every row.

Position shift: the latent fed at latent index t is z_t = mu_t + sigma * eps,
and mu_t is the post-final-norm hidden state at sequence index s0 + t - 1: z_0 comes from
the <|latent_start|> position, z_t (t > 0) from the position where z_{t-1} was fed. In
the teacher-forced forward the hidden state at index s0 + t - 1 is therefore the mean of
the Gaussian that produced the input at index s0 + t.

Two rollout backends give the same rollouts (``sample_rollouts(backend=...)``,
``VLPOConfig.rollout_backend``):

- "engine" (default): ``medlvr.engine.LatentEngine.generate`` with ``latent_noise_std``
  and ``group_size=n``: each prompt prefilled once, its K/V shared by its n rows
  (medlvr/engine/group.py); static KV cache, decode kernels, CUDA graphs on GPU. The
  engine comes from an :class:`medlvr.engine.EngineHolder` (``RolloutEngine``), built once
  and reused across VLPO steps; it holds references to the model's modules, so optimizer
  steps (LoRA included) are seen by the next rollout.
- "hf": the plain-HF KV-cached loop of medlvr/engine/hf_loop.py, the engine's
  outside reference, kept as a fallback (models the engine has no adapter for) and as the
  test reference.

Both draw their randomness from the caller's generator in the engine's order: the latent
noise as one (R, K, D) normal tensor in the model dtype (only when sigma > 0 and K > 0),
then one (R, V) tensor of Exp(1) variates per answer token, from which the token is the
"exponential race" sample argmax_i p_i / E_i over the top-p nucleus (an exact sample of
the nucleus distribution, see medlvr/engine/sampling.py). With the same seed the two
backends therefore give the same rollouts up to floating-point differences of the
kernels (tests/train/test_vlpo.py checks z, mu, tokens and log-probs).

Positions: the prompt's 3-section mRoPE positions come from medlvr/models/hf.py (HF
get_rope_index); every step after the prompt is text-like, so all three sections advance
by one from the last prompt position (docs/engine.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medlvr.engine.hf_loop import latent_loop
from medlvr.engine.holder import EngineHolder
from medlvr.models import hf
from medlvr.ops import latent_gaussian_logprob, lm_head_logprobs
from medlvr.policy import Batch, latent_mu
from medlvr.policy.prompt import prompt_inputs

__all__ = ["Rollouts", "RolloutEngine", "RolloutSettings", "BACKENDS", "PolicyStates", "image_features",
           "vision_frozen", "prompt_inputs",
           "sample_rollouts", "policy_states", "state_logprobs", "policy_forward"]

BACKENDS = ("engine", "hf")


def image_features(model: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
    """Merged vision tokens [T, D] of the batch's images (packing order), None without images."""
    return hf.vision_tokens(model, batch.pixel_values, batch.image_grid_thw)


def vision_frozen(model: torch.nn.Module) -> bool:
    """No trainable parameter in the vision tower: its features are the same for the policy,
    the old policy and the reference, so one computation per step serves all passes."""
    tower = hf.vision_tower(model)
    return tower is None or not any(p.requires_grad for p in tower.parameters())


# ----------------------------------------------------------------------- rollouts ---
@dataclass
class Rollouts:
    """n rollouts per prompt, rows grouped by prompt (row i*n + j = prompt i, sample j).

    latents [R,K,D] (the fed-back inputs z_t), latent_mu [R,K,D] (their means mu_t, i.e.
    feedback of the hidden state at index s0 + t - 1; z_t - mu_t = sigma * eps_t),
    latent_logprobs [R,K] and token_logprobs [R,T] (log-probs under the behaviour policy
    at sampling time: Gaussian for latents, softmax(logits / temperature) for tokens),
    tokens [R,T] (pad after the stop token), token_mask [R,T] (1 up to and including the
    stop token), stopped [R] (stop token reached before max_new_tokens), prompt
    (prompt_inputs of the repeated rows).
    """
    prompt: dict[str, torch.Tensor]
    latents: torch.Tensor
    latent_logprobs: torch.Tensor
    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    token_mask: torch.Tensor
    stopped: torch.Tensor
    n: int
    latent_mu: torch.Tensor | None = None


# The VLPO trainer's name for the engine holder (medlvr/engine/holder.py): one per
# ``train_vlpo`` call, reused by every rollout of it.
RolloutEngine = EngineHolder


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled, checked once when made (VLPOConfig makes its own once:
    ``VLPOConfig.rollout``). n rollouts per prompt, K fixed latent steps explored with noise
    of std latent_sigma, text sampled at temperature / top-p, up to max_new_tokens."""
    n: int
    k_latent: int
    latent_sigma: float
    temperature: float
    top_p: float
    max_new_tokens: int
    backend: str = "engine"

    def __post_init__(self):
        if self.n < 1 or self.k_latent < 0 or self.max_new_tokens < 1:
            raise ValueError(f"need n >= 1, k_latent >= 0, max_new_tokens >= 1; got n={self.n}, "
                             f"k_latent={self.k_latent}, max_new_tokens={self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for VLPO rollouts, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.k_latent > 0 and self.latent_sigma < 0:
            raise ValueError(f"latent_sigma must be >= 0, got {self.latent_sigma}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@torch.no_grad()
def sample_rollouts(model: torch.nn.Module, batch: Batch, settings: RolloutSettings | None = None, *,
                    latent_end_id: int, stop_id: int, pad_id: int, generator: torch.Generator | None = None,
                    projector: torch.nn.Module | None = None, vision: torch.Tensor | None = None,
                    prompt: dict[str, torch.Tensor] | None = None, engine: RolloutEngine | None = None,
                    **settings_kw) -> Rollouts:
    """Sample n rollouts per prompt with latent exploration z_t = mu_t + sigma * eps.

    batch: left-padded prompts ending with <|latent_start|> (collate with_answer=False).
    projector: the optional stage-1 feedback map (medlvr.policy.latent.LatentProjector);
    then mu_t = projector(h[s0 + t - 1]).
    Text tokens are sampled from softmax(logits / temperature) restricted to the top-p
    nucleus; the recorded token log-prob is under softmax(logits / temperature) (the
    quantity the training forward recomputes, as in TRL / verl).
    backend: "engine" (LatentEngine; ``engine`` reuses one across calls, else one is built
    for this call, with ``projector``) or "hf" (the plain HF loop). Same random draws from
    ``generator`` in both (module docstring). vision: precomputed image features, used by
    the "hf" loop and for ``Rollouts.prompt`` (the engine's prefill runs the model on the
    images itself). prompt: :func:`medlvr.policy.prompt.prompt_inputs` of ``batch`` repeated n
    times, when the caller already has it (VLPO builds it once per step); else built here.
    settings: a :class:`RolloutSettings`, or its fields as keywords (n, k_latent, ...).
    """
    s = settings if settings is not None else RolloutSettings(**settings_kw)
    if settings is not None and settings_kw:
        raise ValueError(f"settings: given together with the keywords {sorted(settings_kw)}; pass one of the two")
    if prompt is None:
        prompt = prompt_inputs(model, batch, repeat=s.n, vision=vision)
    if s.backend == "engine":
        return _engine_rollouts(model, batch, s, prompt, latent_end_id=latent_end_id, stop_id=stop_id,
                                pad_id=pad_id, generator=generator, projector=projector, engine=engine)
    out = latent_loop(model, prompt, k=s.k_latent, max_new_tokens=s.max_new_tokens, first_token=latent_end_id,
                      projector=projector, latent_noise_std=float(s.latent_sigma), temperature=float(s.temperature),
                      top_p=float(s.top_p), stop_ids=[stop_id], pad_id=pad_id, generator=generator)
    return _rollouts(prompt, s.n, s.latent_sigma, stop_id, out.latents, out.latent_mu, out.tokens,
                     out.token_logprobs, out.text_lengths)


def _engine_rollouts(model, batch, s: RolloutSettings, prompt, *, latent_end_id, stop_id, pad_id, generator,
                     projector, engine) -> Rollouts:
    """sample_rollouts through LatentEngine: prefill -> K fixed latent steps with noise ->
    <|latent_end|> -> answer (the same sequence policy_forward scores). The n rows of a
    prompt share its prefill and K/V (group_size=n)."""
    if engine is None:
        engine = EngineHolder(model, projector=projector, len_multiple=1)
    elif engine.projector is not projector:
        raise ValueError("engine: its projector differs from the rollout's projector argument")
    # The engine's exact need: the prompt in the shared prompt cache; in each row's own cache
    # K latents + <|latent_end|> + every answer token but the last.
    rows, group = batch.model_inputs(), dict(group_size=s.n)
    eng = engine.for_batch(rows, k_max=s.k_latent, max_new_tokens=s.max_new_tokens, group_size=s.n)
    kw = dict(temperature=float(s.temperature), top_p=float(s.top_p), stop_ids=[stop_id], pad_id=pad_id,
              generator=generator)
    if s.k_latent > 0:
        out = eng.generate(rows, k_max=s.k_latent, exit="fixed", max_new_tokens=s.max_new_tokens,
                           latent_end_id=latent_end_id, latent_noise_std=float(s.latent_sigma), **group, **kw)
        latents, hidden, tokens, tok_logp, lengths = (out.latents, out.latent_hidden, out.tokens,
                                                      out.token_logprobs, out.text_lengths)
    else:
        # generate(k_max=0) feeds no <|latent_end|>; VLPO's sequence (policy_forward) always
        # has one, so the phases are called directly with it as the first fed token.
        eng.prefill(rows, **group)
        seg = eng.latent_segment(0)
        text = eng.decode_text(s.max_new_tokens, first_token=latent_end_id, **kw)
        latents, hidden, tokens, tok_logp, lengths = (seg.latents, seg.latent_hidden, text.tokens,
                                                      text.token_logprobs, text.text_lengths)
    mu = hidden if projector is None else projector(hidden.flatten(0, 1)).view_as(hidden).to(hidden.dtype)
    return _rollouts(prompt, s.n, s.latent_sigma, stop_id, latents, mu, tokens, tok_logp, lengths)


def _rollouts(prompt, n, latent_sigma, stop_id, latents, mu, tokens, tok_logp, lengths) -> Rollouts:
    """Rollouts from either backend's output: the Gaussian log-probs of the latents and
    the token masks are computed here, the same way for both."""
    R, K, D = latents.shape
    if K > 0 and latent_sigma > 0:
        lat_logp = latent_gaussian_logprob(mu.reshape(-1, D), latents.reshape(-1, D), sigma=latent_sigma).view(R, K)
    else:
        lat_logp = torch.zeros(R, K, dtype=torch.float32, device=latents.device)
    T = tokens.shape[1]
    tok_mask = torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    stopped = (lengths > 0) & (last == stop_id)
    return Rollouts(prompt=prompt, latents=latents, latent_logprobs=lat_logp, tokens=tokens,
                    token_logprobs=tok_logp, token_mask=tok_mask, stopped=stopped, n=n, latent_mu=mu)


# ------------------------------------------------------------- teacher-forced pass ---
@dataclass
class PolicyStates:
    """The teacher-forced pass's states the VLPO objective needs.

    answer [R,T,D]: the hidden state that predicts answer token t (index s0 + K + t); mu
    [R,K,D]: the latent means mu_t (hidden at s0 + t - 1, through the projector), None when
    K == 0 or sigma == 0 (no latent log-prob)."""
    answer: torch.Tensor
    mu: torch.Tensor | None


def policy_states(model: torch.nn.Module, ro: Rollouts, *, latent_end_id: int, latent_sigma: float,
                  prompt: dict[str, torch.Tensor] | None = None,
                  projector: torch.nn.Module | None = None) -> PolicyStates:
    """One decoder forward over the whole rollout sequence (no lm_head).

    Inputs at the latent positions are the rollout's z_t (as inputs_embeds), so the
    sequence the policy scores is exactly the one the behaviour policy produced.
    ``prompt`` (prompt_inputs of the same rows) lets a caller recompute the prompt
    embeddings under this model, e.g. with the adapter disabled; default: the rollout's.
    """
    base = hf.unwrap(model)
    p = ro.prompt if prompt is None else prompt
    R, P, D = p["embeds"].shape
    K, T = ro.latents.shape[1], ro.tokens.shape[1]
    dev = p["embeds"].device
    embed = base.get_input_embeddings()
    end = embed(torch.full((R, 1), latent_end_id, dtype=torch.long, device=dev))
    embeds = torch.cat([p["embeds"], ro.latents.to(p["embeds"].dtype), end, embed(ro.tokens)], dim=1)
    steps = torch.arange(1, K + 2 + T, device=dev)
    pos = torch.cat([p["position_ids"], p["position_ids"][:, :, -1:] + steps], dim=2)
    mask = torch.cat([p["attention_mask"], torch.ones(R, K + 1, dtype=p["attention_mask"].dtype, device=dev),
                      ro.token_mask.to(p["attention_mask"].dtype)], dim=1)
    hidden = hf.run_decoder(base, embeds, mask, pos)

    s0 = P  # index of the first latent input (prompt ends with <|latent_start|>)
    mu = None
    if K > 0 and latent_sigma > 0:
        mu = latent_mu(hidden, s0, K)  # mu_t from index s0 + t - 1: the shift (medlvr/policy/batch.py)
        if projector is not None:
            mu = projector(mu)
    a0 = s0 + K + 1  # index of the first answer token; predicted by the hidden at a0 - 1
    return PolicyStates(answer=hidden[:, a0 - 1:a0 - 1 + T], mu=mu)


def state_logprobs(model: torch.nn.Module, ro: Rollouts, states: PolicyStates, *, temperature: float,
                   latent_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logp [R,T], latent_logp [R,K]) of the rollout under ``states``: the lm_head +
    log-softmax fused (``medlvr.ops.lm_head_logprobs``: no (tokens, V) logits tensor), and
    log N(z_t; mu_t, sigma^2) (zeros without mu). 0 where token_mask is 0."""
    R, K, D = ro.latents.shape
    dev = states.answer.device
    if states.mu is not None:
        lat = latent_gaussian_logprob(states.mu.reshape(-1, D), ro.latents.reshape(-1, D),
                                      sigma=latent_sigma).view(R, K)
    else:
        lat = torch.zeros(R, K, dtype=torch.float32, device=dev)
    keep = ro.token_mask
    tok = torch.zeros(keep.shape, dtype=torch.float32, device=dev)
    tok = tok.masked_scatter(keep, lm_head_logprobs(hf.unwrap(model).lm_head, states.answer[keep], ro.tokens[keep],
                                                    temperature=temperature))
    return tok, lat


def policy_forward(model: torch.nn.Module, ro: Rollouts, *, latent_end_id: int, temperature: float,
                   latent_sigma: float, prompt: dict[str, torch.Tensor] | None = None,
                   projector: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of a rollout under ``model``: :func:`policy_states` + :func:`state_logprobs`.

    Returns token_logp [R,T] (0 where token_mask is 0) and latent_logp [R,K]
    (log N(z_t; mu_t, sigma^2), mu_t = hidden at index s0 + t - 1; zeros when K == 0 or
    sigma == 0). What VLPO scores its old and reference log-probs with (no gradient); the
    gradient-carrying pass goes through ``medlvr.ops.fused_vlpo_loss`` instead
    (medlvr/train/vlpo/step.py).
    """
    states = policy_states(model, ro, latent_end_id=latent_end_id, latent_sigma=latent_sigma, prompt=prompt,
                           projector=projector)
    return state_logprobs(model, ro, states, temperature=temperature, latent_sigma=latent_sigma)
