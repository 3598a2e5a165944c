"""The public systems' latent loops, written from their code, step by step, on plain HF
calls (medlvr/models/hf.py): the outside oracles of medlvr's drop-in presets
(tests/dropin/test_presets.py) and the baselines of benchmarks/bench_dropin.py.

They share nothing with medlvr's exit rules (medlvr/engine/exit_rules.py) or its engine:
each keeps the original's own state variables and host-side control flow. Where the
original samples, these take the argmax (greedy decoding), which the originals do with
``do_sample=False``.

Sources (read at these commits):
- facebookresearch/coconut 27273cb8cca4bb763c041a63b036d0c3b7cbbb48, coconut.py:
  ``Coconut.forward`` and ``Coconut.generate``.
- VincentLeebang/lvr 637a9f7e17e865b1372b65f182197fbc4a5a1449, src/model/qwen_lvr_model.py:
  ``QwenWithLVR._lvr_deocding`` (end token), ``_lvr_deocding_with_latentend`` (distance),
  ``_lvr_deocding_by_steps`` (fixed steps); src/train/monkey_patch_forward_lvr.py:
  ``qwen2_5_mixed_modality_forward_lvr_inference`` (the fed vector).
- bent1e/Monet 224f1f677c50d80fe21d93fe09fd3b40a50d929d,
  RL/monet_models/vllm/monet_gpu_model_runner.py: ``execute_model`` (the LATENT blocks).
- UMass-Embodied-AGI/Mirage 53f26de2682025e146781c5b198ec93bdfe4c4d6,
  transformers/src/transformers/generation/utils.py: ``GenerationMixin._sample``.

Each loop returns a ``LoopResult``: per row the latents fed (n_b, D) and ``after``, the ids
the original appends from the step that leaves the segment on (its first entry is what is
fed right after the segment), up to and including eos, within the original's token budget
(``max_new_tokens`` counts every appended id, latent placeholders included, except in
Coconut whose latents are prompt tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medlvr.models import hf


@dataclass
class LoopResult:
    latents: list  # per row: (n_b, D) the vectors fed in place of token embeddings
    after: list  # per row: the ids appended from the segment's exit on


class _Decoder:
    """One HF decoder call per step over a DynamicCache for a left-padded batch: what the
    originals' generate loops (HF ``_sample`` / vLLM decode) run, one position per row."""

    def __init__(self, model, batch):
        p = hf.prompt_inputs(model, batch)
        self.model, self.mask, self.cache = model, p["attention_mask"], hf.new_cache(model)
        self.embed, self.head = model.get_input_embeddings(), model.lm_head
        self.h = hf.run_decoder(model, p["embeds"], self.mask, p["position_ids"], self.cache)[:, -1]
        self.next_pos = p["position_ids"][..., -1:] + 1

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """Feed x (B, D) at every row's next position; return the post-norm hidden (B, D)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.h = hf.run_decoder(self.model, x[:, None].to(self.h.dtype), self.mask, self.next_pos, self.cache)[:, -1]
        self.next_pos = self.next_pos + 1
        return self.h

    def argmax(self) -> torch.Tensor:
        return self.head(self.h).float().argmax(dim=-1)


def drop_last_column(batch: dict) -> dict:
    """The batch without its last column (a left-padded batch whose rows all end with <start>)."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out:
            out[key] = out[key][:, :-1]
    return out


# ---------------------------------------------------------------------------------- Coconut
@torch.no_grad()
def coconut(model, ids: torch.Tensor, *, latent_id: int, eos: int, max_new_tokens: int) -> LoopResult:
    """facebookresearch/coconut@27273cb, coconut.py, ``Coconut.generate`` and ``Coconut.forward``.

    ``Coconut.generate`` (batch 1: it asserts input_ids.shape[0] == 1) over
    ``Coconut.forward``. forward: pass 0 runs the prefix before the first <|latent|>; each
    pass fills the next <|latent|> embedding with the last hidden state (hidden_states[-1],
    GPT-2's post-ln_f output) at the position before it and runs that one position on the
    KV cache; the final pass runs the rest of the prompt (the last latent, <|end-latent|>).
    generate: the first token is the argmax at the last position and is appended without
    an eos test; then each token re-runs the whole embedding sequence without a cache
    (``self.base_causallm(inputs_embeds=...)``) and eos ends generation without being
    appended."""
    if ids.dim() != 1:
        raise ValueError("Coconut's generate runs batch 1: ids must be (S,)")
    embed = model.get_input_embeddings()
    embeds = embed(ids).clone()
    where = (ids == latent_id).nonzero().flatten().tolist()
    S = ids.shape[0]
    positions = torch.arange(S, device=ids.device)[None]
    ones = torch.ones(1, S, dtype=torch.long, device=ids.device)
    cache = hf.new_cache(model)
    done = 0  # positions already in the cache (next_compute_range[0])
    compute_end = where[0] if where else S
    for p in where:
        h = hf.run_decoder(model, embeds[None, done:compute_end], ones[:, :compute_end],
                           positions[:, done:compute_end], cache)[0]
        embeds[p] = h[p - 1 - done]  # hidden_states[batch, token_idx - 1 - hidden_states_offset]
        done, compute_end = compute_end, compute_end + 1
    h = hf.run_decoder(model, embeds[None, done:], ones, positions[:, done:], cache)[0]  # final pass
    latents = embeds[where].clone() if where else embeds.new_zeros(0, embeds.shape[-1])
    tokens = [int(model.lm_head(h[-1]).argmax())]  # appended without an eos test
    seq = torch.cat([embeds, embed(ids.new_tensor(tokens))])
    for _ in range(max_new_tokens - 1):
        h = hf.run_decoder(model, seq[None], None, torch.arange(seq.shape[0], device=ids.device)[None])[0]
        tok = int(model.lm_head(h[-1]).argmax())
        if tok == eos:
            break
        tokens.append(tok)
        seq = torch.cat([seq, embed(ids.new_tensor([tok]))])
    return LoopResult(latents=[latents], after=[tokens])


# ---------------------------------------------------------------------------------- LVR
def _lvr_end_switch(strategy, *, next_tokens, lphs, end_id, end_emb, threshold, criterion):
    if strategy == "end_token":  # _lvr_deocding: lvr_end_switch = next_tokens == lvr_end_id
        return next_tokens == end_id
    if strategy == "steps" or lphs is None:  # no end test / nothing fed yet
        return torch.zeros_like(next_tokens, dtype=torch.bool)
    diff = lphs - end_emb.to(lphs.dtype)  # criterion_fct(lphs, end_emb).mean(dim=-1), in the model dtype
    d = diff.pow(2) if criterion == "mse" else diff.abs()
    return d.mean(dim=-1) < threshold


def _lvr_mode(strategy: str, mode, start, end, counter, remaining, steps):
    """(mode after this iteration, counter, remaining): the per-strategy update of lvr's
    docstring (end_token / distance / steps)."""
    if strategy == "steps":
        new = mode | start
        remaining = torch.where(~mode & new, torch.full_like(remaining, steps), remaining)
        remaining = remaining - mode.long()
        return new & (remaining > 0), counter, remaining
    if strategy == "distance":
        counter = counter + mode.long()
        counter = torch.where(start, torch.zeros_like(counter), counter)
        return (mode | start) & ~end & ~(counter >= steps), counter, remaining
    return (mode | start) & ~end, counter, remaining


@torch.no_grad()
def lvr(model, batch: dict, *, strategy: str, start_id: int, end_id: int, eos: int, max_new_tokens: int,
        steps: int | None = None, end_embedding: torch.Tensor | None = None, threshold: float = 0.02,
        criterion: str = "mse", pad_id: int = 0, head=None) -> LoopResult:
    """VincentLeebang/lvr@637a9f7, src/model/qwen_lvr_model.py, ``QwenWithLVR._lvr_deocding``
    / ``_lvr_deocding_with_latentend`` / ``_lvr_deocding_by_steps``; the fed vector from
    src/train/monkey_patch_forward_lvr.py, ``qwen2_5_mixed_modality_forward_lvr_inference``.

    LVR's patched ``_sample`` loops, strategy "end_token" (``_lvr_deocding``, generate's
    default), "distance" (``_lvr_deocding_with_latentend``, decoding_strategy="latent") or
    "steps" (``_lvr_deocding_by_steps``, its evaluation's). Per iteration: the forward
    (monkey_patch_forward_lvr.py) replaces the last input embedding of rows in LVR mode by
    last_position_hidden_state, the previous output (post-norm); the argmax token is
    appended in every row (placeholders while in the mode); then, from the token fed
    (``last_tokens == lvr_start_id``) and the mode before the update:
      end_token: mode = (mode | start) & ~(next == lvr_end): tested at <start>'s own
        output too; no step cap, and the length budget does not end the mode either (below);
      distance: end = mean_i criterion(lphs, e_end) < threshold with lphs the vector just
        fed (None at <start>); counter += mode, reset at start; mode = (mode | start) & ~end
        & ~(counter >= max_steps);
      steps: remaining = steps on entry, -= mode; mode = (mode | start) & (remaining > 0).
    A row in the mode never finishes: unfinished = mode | (unfinished & ~stop). (The loop
    below stops after 4 * max_new_tokens + 64 iterations, a guard of this oracle: the original
    has none.)

    head: the optional lvr_head (src/model/lvr_heads.py; forward
    ``qwen2_5_mixed_modality_forward_lvr_with_head_inference``): in an iteration that fed a
    latent, the output hidden state is replaced by head(hidden), which is both the next
    fed vector and what lm_head reads; the prompt's pass (not in the mode) has no head, so
    the first latent is the plain hidden state. That forward tests ``if lvr_mode_switch:``,
    which only works for batch 1."""
    dec = _Decoder(model, batch)
    if head is not None and dec.h.shape[0] != 1:
        raise ValueError("LVR's head forward runs batch 1 (it tests `if lvr_mode_switch:`)")
    B = dec.h.shape[0]
    dev = dec.h.device
    last = batch["input_ids"][:, -1].to(dev)
    mode = torch.zeros(B, dtype=torch.bool, device=dev)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    counter = torch.zeros(B, dtype=torch.long, device=dev)
    remaining = torch.full((B,), steps if steps is not None else 0, dtype=torch.long, device=dev)
    lphs = None
    entered = torch.zeros(B, dtype=torch.bool, device=dev)
    latents, after = [[] for _ in range(B)], [[] for _ in range(B)]
    for it in range(4 * max_new_tokens + 64):
        if it > 0:
            x = dec.embed(last)
            if lphs is not None:
                x[mode] = lphs[mode]
            for b in mode.nonzero().flatten().tolist():
                latents[b].append(x[b].clone())
            dec.feed(x)
            if head is not None and bool(mode.any()):
                dec.h = head(dec.h)
        nxt = dec.argmax()
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
        start = last == start_id
        if bool((start & entered).any()):
            raise NotImplementedError("a second LVR segment: medlvr runs one latent segment per answer")
        entered |= start
        end = _lvr_end_switch(strategy, next_tokens=nxt, lphs=lphs, end_id=end_id, end_emb=end_embedding,
                              threshold=threshold, criterion=criterion)
        new_mode, counter, remaining = _lvr_mode(strategy, mode, start, end, counter, remaining, steps)
        lphs = dec.h
        for b in range(B):
            if bool(entered[b]) and not bool(new_mode[b]) and bool(unfinished[b]):
                after[b].append(int(nxt[b]))
        mode, last = new_mode, nxt
        length = it + 1  # ids appended so far
        stop = (nxt == eos) | (length >= max_new_tokens)
        unfinished = mode | (unfinished & ~stop)
        if not bool(unfinished.any()):
            break
    return LoopResult(latents=[torch.stack(v) if v else dec.h.new_zeros(0, dec.h.shape[-1]) for v in latents],
                      after=after)


# ---------------------------------------------------------------------------------- Monet
@torch.no_grad()
def monet(model, batch: dict, *, start_id: int, end_id: int, latent_size: int, eos: int,
          max_new_tokens: int) -> LoopResult:
    """bent1e/Monet@224f1f6, RL/monet_models/vllm/monet_gpu_model_runner.py,
    ``GPUModelRunner.execute_model`` (the LATENT blocks: input override and state update).

    Monet's vLLM runner, per request. The model has just sampled
    <start> (the prompt's last id): the runner sets active, pending = the hidden state that
    sampled it, current_len = 1, and at the next step overrides the input embedding of
    <start>'s own position with pending, so <start> is never embedded. Each step then:
    sample tid from the output; if active and (tid == end or current_len >= LATENT_SIZE):
    leave, and the sampled id is replaced by the end id (fed next as a token); if still
    active: pending = this output, current_len += 1. vLLM's stop check sees every sampled
    id, so eos sampled inside the segment ends the request."""
    if not bool((batch["input_ids"][:, -1] == start_id).all()):
        raise ValueError("every prompt must end with the start token the model sampled")
    dec = _Decoder(model, drop_last_column(batch))  # <start> is not run as a token
    B = dec.h.shape[0]
    dev = dec.h.device
    active = [True] * B
    pending = [dec.h[b].clone() for b in range(B)]  # the hidden state that sampled <start>
    current_len = [1] * B
    finished = [False] * B
    latents, after = [[] for _ in range(B)], [[] for _ in range(B)]
    last = torch.full((B,), start_id, dtype=torch.long, device=dev)
    for n in range(1, max_new_tokens):  # <start> was the first sampled id
        x = dec.embed(last)
        for b in range(B):
            if active[b] and pending[b] is not None:
                x[b] = pending[b]
                latents[b].append(pending[b])
                pending[b] = None
        dec.feed(x)
        tids = dec.argmax().tolist()
        for b in range(B):
            if finished[b]:
                continue
            if not active[b] and tids[b] == start_id:
                raise NotImplementedError("a second Monet segment: medlvr runs one latent segment per answer")
            if active[b] and (tids[b] == end_id or current_len[b] >= latent_size):
                active[b], current_len[b] = False, 0
                tids[b] = end_id  # force-close: the end id is emitted instead
            if active[b]:
                pending[b] = dec.h[b].clone()
                current_len[b] += 1
            else:
                after[b].append(tids[b])
            finished[b] = tids[b] == eos
        if all(finished):
            break
        last = torch.tensor(tids, dtype=torch.long, device=dev)
    return LoopResult(latents=[torch.stack(v) if v else dec.h.new_zeros(0, dec.h.shape[-1]) for v in latents],
                      after=after)


# ---------------------------------------------------------------------------------- Mirage
@torch.no_grad()
def mirage(model, batch: dict, *, start_id: int, end_id: int, latent_pad_id: int, eos: int, max_new_tokens: int,
           max_latent_len: int = 8, pad_id: int = 0) -> LoopResult:
    """UMass-Embodied-AGI/Mirage@53f26de, transformers/src/transformers/generation/utils.py,
    ``GenerationMixin._sample``.

    One latent mode for the whole batch. The prompt ends with
    <start>, which the loop feeds as a token (latent_start). Per iteration, over the rows in
    order: a sampled <start> sets the mode; an end id adds 1 to latent_end_num, and when
    that running count equals the batch size the mode ends (a row can be counted at several
    steps); other rows still in the mode get latent_pad_id. Then, still in the mode,
    latent_num += 1 and past MAX_LATENT_LEN (8) the mode ends with the end id forced on
    every row. In the mode the next input is outputs.hidden_states (post-norm) for every
    row; after it, the appended ids are fed as tokens."""
    dec = _Decoder(model, batch)
    B = dec.h.shape[0]
    dev = dec.h.device
    in_latent, latent_end, latent_num, latent_end_num = True, False, 0, 0
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    latents, after = [[] for _ in range(B)], [[] for _ in range(B)]
    for length in range(1, max_new_tokens + 1):
        nxt = dec.argmax()
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
        was_latent = in_latent
        for i, tok in enumerate(nxt.tolist()):
            if tok == start_id:
                raise NotImplementedError("<start> sampled again: Mirage re-enters its latent mode")
            elif tok == end_id:
                latent_end_num += 1
                if latent_end_num == B:
                    latent_end, in_latent = True, False
            elif in_latent:
                nxt[i] = latent_pad_id
        if in_latent and not latent_end:
            latent_num += 1
            if latent_num > max_latent_len:
                latent_end, in_latent = True, False
                nxt[:] = end_id
        if not in_latent:
            for b in range(B):
                if bool(unfinished[b]) and (was_latent or after[b]):
                    after[b].append(int(nxt[b]))
        unfinished = unfinished & ~((nxt == eos) | (length >= max_new_tokens))
        if not bool(unfinished.any()):
            break
        if in_latent:
            x = dec.h.clone()  # inputs_embeds = outputs.hidden_states
            for b in range(B):
                latents[b].append(x[b])
        else:
            x = dec.embed(nxt)
        dec.feed(x)
    return LoopResult(latents=[torch.stack(v) if v else dec.h.new_zeros(0, dec.h.shape[-1]) for v in latents],
                      after=after)
