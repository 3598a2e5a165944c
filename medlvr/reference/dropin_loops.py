"""The public systems' latent loops, re-implemented as issue 15's table says their code runs
them (batch 1, host-side Python control flow), on plain HF calls. medlvr's drop-in presets
must reproduce them (tests/dropin/test_presets.py) and are timed against them
(benchmarks/bench_dropin.py). Host-built tensors go to the model's device, so the loops run
on a GPU as their users run them there (one host round trip per step included)."""
from __future__ import annotations

import torch

from medlvr.models import hf


@torch.no_grad()
def coconut(model, ids, *, latent_id, max_new_tokens, eos):
    """Coconut's generate (GPT-2): batch 1; each <|latent|> embedding is replaced by the last
    hidden state (post ln_f) at the position before it, one pass over the whole prefix per
    latent; then every answer token re-runs the whole sequence, no KV cache."""
    assert ids.dim() == 1, "Coconut's generate asserts batch size 1"
    wte = model.get_input_embeddings()
    embeds = wte(ids).clone()
    for p in (ids == latent_id).nonzero().flatten().tolist():
        h = model.transformer(inputs_embeds=embeds[None]).last_hidden_state[0]
        embeds[p] = h[p - 1]
    latents = embeds[ids == latent_id].clone()
    tokens = []
    for _ in range(max_new_tokens):
        tok = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        tokens.append(tok)
        if tok == eos:
            break
        embeds = torch.cat([embeds, wte(ids.new_tensor([tok]))])
    return latents, tokens


@torch.no_grad()
def qwen_vl(model, batch, *, k, end_id, max_new_tokens, eos, rule, batch_global=False):
    """LVR / Monet / Mirage style: HF DynamicCache, the post-norm hidden state fed back as
    inputs_embeds; after each step ``rule(h, z_next)`` -> bool per row is read on the host
    (.item()-style) and a row that fired leaves latent mode (Mirage: the whole batch leaves
    when every row has fired). Then <end> is fed and the answer decoded greedily."""
    p = hf.prompt_inputs(model, batch)
    emb, pos, mask = p["embeds"], p["position_ids"], p["attention_mask"]
    B, dev = emb.shape[0], emb.device
    cache = hf.new_cache(model)
    h = hf.run_decoder(model, emb, mask, pos, cache)[:, -1]
    nxt = pos[..., -1:] + 1
    live = [True] * B
    fired = [False] * B
    latents = [[] for _ in range(B)]

    def step(x, on):
        nonlocal mask, nxt
        act = torch.tensor(on, device=dev)
        mask = torch.cat([mask, act[:, None].to(mask.dtype)], 1)
        out = hf.run_decoder(model, x[:, None], mask, nxt, cache)[:, -1]
        nxt = nxt + act[:, None].long()
        return out

    for _ in range(k):
        if not any(live):
            break
        for b in range(B):
            if live[b]:
                latents[b].append(h[b].clone())
        out = step(h, live)
        h = torch.where(torch.tensor(live, device=dev)[:, None], out, h)
        stop = rule(h)
        for b in range(B):
            if live[b] and bool(stop[b]):
                fired[b] = True
        if batch_global:
            if all(fired):
                live = [False] * B
        else:
            live = [lv and not bool(s) for lv, s in zip(live, stop)]
    on = [True] * B
    h = step(model.get_input_embeddings()(torch.full((B,), end_id, device=dev)), on)
    tokens = [[] for _ in range(B)]
    for j in range(max_new_tokens):
        tok = model.lm_head(h).argmax(-1)
        for b in range(B):
            if on[b]:
                tokens[b].append(int(tok[b]))
        on = [o and int(t) != eos for o, t in zip(on, tok)]
        if not any(on) or j == max_new_tokens - 1:
            break
        h = step(model.get_input_embeddings()(tok), on)
    return [torch.stack(l) if l else h.new_zeros(0, h.shape[-1]) for l in latents], tokens
