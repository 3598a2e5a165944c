"""The latent loop without a KV cache, fixed K: the executable spec of the plain-HF loop
(medlvr/engine/hf_loop.py, ``latent_loop`` with exit="fixed"), checked against it by
tests/engine/test_hf_loop_spec.py.

Every step runs the whole HF decoder again over the sequence so far, with explicit
positions and no cache, and reads the post-norm hidden state of its last position
(docs/engine.md, "Sequence and the z/mu shift")::

    prompt ... <|latent_start|> | z_0 ... z_{K-1} | [first_token] | a_0 a_1 ...

    h_{-1}  = last hidden of the prompt
    z_t     = projector(h_{t-1}) + sigma * eps_t        (eps given; sigma = 0: no noise)
    h_t     = last hidden of [prompt ; z_0 .. z_t]
    a_j     = argmax lm_head(h)   greedy, h the last hidden of everything fed before a_j

Positions: the prompt's are HF's (``medlvr.models.hf.prompt_inputs``: 3-section mRoPE for
the Qwen VL models, 1-D for text decoders); every column after the prompt is text-like and
advances all sections by one from the prompt's last position. Attention: the prompt's
mask (left padding masked), every column after it visible.

A row stops after its first stop id; its later tokens are ``pad_id``. The spec keeps
feeding that row (its own greedy tokens): a row attends to nothing but itself, so what it
is fed after its stop changes no other row and none of its own recorded values.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from medlvr.models import hf


class LoopSpec(NamedTuple):
    """latents (B K D) the z_t fed; tokens (B T) greedy answer tokens (pad after a row's stop);
    logits (B T V) fp32 the logits each token was chosen from (0 after the stop)."""

    latents: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def latent_loop_ref(model: torch.nn.Module, prompt: Mapping[str, Any], *, k: int, max_new_tokens: int,
                    first_token: int | None = None, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    latent_noise_std: float = 0.0, latent_eps: torch.Tensor | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0) -> LoopSpec:
    """K latent steps, then ``first_token`` (if given), then up to max_new_tokens greedy tokens,
    for a left-padded model-input batch (input_ids, attention_mask, pixel_values,
    image_grid_thw, mm_token_type_ids). latent_eps (B K D): the standard-normal draws of the
    latent noise, needed when latent_noise_std > 0."""
    if latent_noise_std > 0 and k > 0 and latent_eps is None:
        raise ValueError("latent_eps: expected the (B, K, D) noise draws when latent_noise_std > 0, got None")
    model = hf.unwrap(model)
    p = hf.prompt_inputs(model, prompt)
    prompt_embeds, prompt_pos, prompt_mask = p["embeds"], p["position_ids"], p["attention_mask"]
    B, _, D = prompt_embeds.shape
    dtype, device = prompt_embeds.dtype, prompt_embeds.device
    embed, lm_head = model.get_input_embeddings(), model.lm_head
    feedback = projector if projector is not None else (lambda x: x)
    fed: list[torch.Tensor] = []  # the (B, D) columns after the prompt, in order

    def last_hidden() -> torch.Tensor:
        """The decoder over [prompt ; fed], no cache: the post-norm hidden of the last position."""
        n = len(fed)
        x = torch.cat([prompt_embeds, *(c[:, None].to(dtype) for c in fed)], dim=1)
        after = torch.arange(1, n + 1, device=device)
        pos = torch.cat([prompt_pos, prompt_pos[..., -1:] + after], dim=-1)  # (3, B, S+n) or (B, S+n)
        mask = torch.cat([prompt_mask, torch.ones(B, n, dtype=prompt_mask.dtype, device=device)], dim=1)
        return hf.run_decoder(model, x, mask, pos)[:, -1]

    latents = torch.zeros(B, k, D, dtype=dtype, device=device)
    for t in range(k):
        mu = feedback(last_hidden())
        if latent_noise_std > 0:
            # in fp32 at least, rounded once to the model dtype
            wide = torch.promote_types(dtype, torch.float32)
            z = (mu.to(wide) + latent_noise_std * latent_eps[:, t].to(wide)).to(dtype)
        else:
            z = mu.to(dtype)
        latents[:, t] = z
        fed.append(z)

    T, V = max_new_tokens, lm_head.out_features
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    logits_out = torch.zeros(B, T, V, dtype=torch.float32, device=device)
    if T == 0:
        return LoopSpec(latents, tokens, logits_out)
    if first_token is not None:
        fed.append(embed(torch.full((B,), first_token, dtype=torch.long, device=device)))
    live = [True] * B
    for j in range(T):
        logits = lm_head(last_hidden()).float()
        tok = logits.argmax(dim=-1)
        for b in range(B):
            if live[b]:
                tokens[b, j] = tok[b]
                logits_out[b, j] = logits[b]
                live[b] = int(tok[b]) not in stop_ids
        if not any(live):
            break
        fed.append(embed(tok))
    return LoopSpec(latents, tokens, logits_out)
