"""One decode step of the latent engine: every decoder layer for one token per row over the
static cache, the latent step (feedback, noise, exit rules as masks) and the text step
(embed, forward, sample). ``LatentEngine`` (medlvr/engine/engine.py) runs these inside the
functions it captures as CUDA graphs, so nothing here syncs with the host or copies from
it (tests/engine/test_capture_safety.py checks that on CPU).

Per layer on GPU: cuBLAS GEMMs plus the Triton kernels of medlvr/ops/decode.py (rotary +
KV append, split-K decode attention, residual add + RMSNorm); on CPU the same code runs
their references.
"""
from __future__ import annotations

from typing import Callable

import torch

from medlvr.engine.adapters.base import ModelAdapter
from medlvr.engine.cache import StaticKVCache
from medlvr.engine.fused import FusedProjections
from medlvr.engine.group import cascade_attention
from medlvr.engine.request import TextParams
from medlvr.engine.state import DecodeState
from medlvr.ops.decode import decode_attention, rotary_append
from medlvr.engine import exit_rules, sampling
from medlvr.engine.exit_rules import ExitRule


class DecodeStep:
    """The step math over one engine's buffers (all held by reference).

    prefix: the shared prompt cache of grouped generation, or None. stop_head: the model's
    ``latent_stop_head`` (exit "stop_logit" with a head), or None. projector_logits: the
    segment's hidden state ``h`` (what the exit tests and the first answer token read) is the
    projected one (LVR's lvr_head)."""

    def __init__(self, *, adapter: ModelAdapter, cache: StaticKVCache, prefix: StaticKVCache | None,
                 state: DecodeState, fused: FusedProjections | None,
                 projector: Callable[[torch.Tensor], torch.Tensor] | None, stop_head: torch.nn.Module | None,
                 projector_logits: bool = False):
        self.adapter, self.cache, self.prefix, self.state = adapter, cache, prefix, state
        self.fused, self.projector, self.stop_head = fused, projector, stop_head
        self.projector_logits = projector_logits
        self.device, self.max_len = adapter.device, cache.max_len

    def layers(self, x: torch.Tensor, active: torch.Tensor, bound: int) -> torch.Tensor:
        """All decoder layers for one token per row over the static cache. Rows with
        ``active`` append their K/V at slot length[b]; the others write nothing.

        bound: a host-known upper bound of max(length) + 1 for this step. On CPU the cache
        is handed to the ops cut to it: the PyTorch references read every position they
        are given, so without the cut each step would cost O(max_len), not O(length).
        On CUDA the kernels skip positions past each length themselves, and a captured
        graph needs fixed shapes, so the full cache is passed."""
        a, s = self.adapter, self.state
        cut = slice(None) if self.device.type != "cpu" else slice(0, min(bound, self.max_len))
        pcut = slice(None) if self.device.type != "cpu" else slice(0, max(s.prefix_host_len, 1))
        Bk = x.shape[0]
        lengths = self.state.length[:Bk]
        slots = torch.where(active, lengths, torch.full_like(lengths, -1))
        attn_len = lengths + active.long()  # the step's own key included
        pos = self.state.pos[:, :Bk] if a.mrope_section is not None else self.state.pos[0, :Bk]
        # learned absolute positions (GPT-2) are added to the input, latent or token
        h = x if a.position_embedding is None else x + a.position_embedding(pos).to(x.dtype)
        # Residual adds are fused with the norm that follows them (adapter.add_layer_norm:
        # add_rmsnorm for RMSNorm models): attention output + input norm of the MLP, and MLP
        # output + the next layer's input norm. Only the first input norm and the last
        # MLP's add stand alone; the final norm is the caller's (norm_feedback).
        layers = a.layers
        normed = a.layer_norm(h, layers[0].input_norm, a.layer_eps[0][0])
        for i, layer in enumerate(layers):
            fused = self.fused.layers[i] if self.fused is not None else None
            if fused is not None:
                q, k, v = fused.qkv(normed)
            elif layer.qkv is not None:
                q, k, v = layer.qkv(normed)
            else:
                q, k, v = layer.q_proj(normed), layer.k_proj(normed), layer.v_proj(normed)
            q = q.view(Bk, a.num_heads, a.head_dim)
            k = k.view(Bk, a.num_kv_heads, a.head_dim)
            v = v.view(Bk, a.num_kv_heads, a.head_dim)
            k_cache, v_cache = self.cache.k[i][:, :, cut], self.cache.v[i][:, :, cut]
            q = rotary_append(q, k, v, positions=pos, inv_freq=a.inv_freq, mrope_section=a.mrope_section,
                              k_cache=k_cache, v_cache=v_cache, slots=slots, rotary_dim=a.rotary_dim)
            if s.group:  # grouped rows: shared prompt prefix + own suffix (medlvr/engine/group.py)
                o = cascade_attention(q, k_cache, v_cache, attn_len, k_prefix=self.prefix.k[i][:, :, pcut],
                                      v_prefix=self.prefix.v[i][:, :, pcut], group=s.group, prompts=s.prompts,
                                      prompt_lengths=s.prefix_len[:s.prompts], row_prompt=s.prefix_row[:Bk],
                                      row_lengths=s.prefix_row_len[:Bk], scale=a.attn_scale)
            else:
                o = decode_attention(q, k_cache, v_cache, attn_len, scale=a.attn_scale)
            normed, h = a.add_layer_norm(layer.o_proj(o.reshape(Bk, a.num_heads * a.head_dim)), h,
                                         layer.post_norm, a.layer_eps[i][1])
            m = fused.mlp(normed) if fused is not None else layer.mlp(normed)
            if i + 1 < len(layers):
                normed, h = a.add_layer_norm(m, h, layers[i + 1].input_norm, a.layer_eps[i + 1][0])
            else:
                h = h + m
        return h

    def latent_step(self, t: int, rule: ExitRule, lat: torch.Tensor, hid: torch.Tensor,
                    eps: torch.Tensor | None) -> None:
        s = self.state
        Bk = s.bucket
        x, mu, h, active = s.x[:Bk], s.mu[:Bk], s.h[:Bk], s.active[:Bk]
        keep = active[:, None]
        lat[:, t].copy_(x.masked_fill(~keep, 0))
        hid[:, t].copy_(h.masked_fill(~keep, 0))
        out = self.layers(x, active, s.host_len + t + 1)
        s.num_latent[:Bk] += active.long()
        s.advance(active)
        prev = mu.clone()
        # Exited rows keep their last state: after the segment mu/h (and x) hold each
        # sample's state at its own last position.
        normed = self.adapter.norm_feedback(out, out=mu, active=active, projector=self.projector)
        if self.projector is None or self.projector_logits:
            h.copy_(mu)
        else:
            h.copy_(torch.where(keep, normed.to(h.dtype), h))
        if t + 1 < lat.shape[1]:  # the last step's output is not fed as a latent
            nxt = s.feed(mu, eps[:, t + 1]) if eps is not None else mu
            x.copy_(torch.where(keep, nxt, x))
        self.exit_test(rule, fed=lat[:, t], mu=prev, mu_next=mu, h=h)

    def exit_test(self, rule: ExitRule, *, fed: torch.Tensor | None, mu: torch.Tensor | None,
                  mu_next: torch.Tensor | None, h: torch.Tensor) -> None:
        """Run the rule's stop test (medlvr/engine/exit_rules.py) and take the rows (or,
        with scope "batch", the whole batch) it ends out of the segment: masks on the
        device, no host branch. With after_exit "mirage" the exit writes each row's next
        token into state.tok."""
        s = self.state
        Bk = s.bucket
        active = s.active[:Bk]
        stop, tok = exit_rules.stop_mask(rule, threshold=s.threshold, fed=fed, mu=mu, mu_next=mu_next, h=h,
                                         lm_head=self.adapter.lm_head, end_id=s.latent_end, stop_head=self.stop_head,
                                         num_latent=s.num_latent[:Bk], counts=s.k_row[:Bk], end_embedding=s.end_emb)
        if stop is None:
            return
        if rule.scope == "batch":
            exits, first = exit_rules.batch_exit(stop, active, s.fired_count, s.batch_size)
            if rule.after == "mirage":
                after = exit_rules.mirage_after_tokens(tok, stop, first, s.latent_end, s.latent_pad)
                s.tok[:Bk].copy_(torch.where(exits & active, after, s.tok[:Bk]))
            active.logical_and_(~exits)
        else:
            active.logical_and_(~stop)

    def start_test(self, rule: ExitRule) -> None:
        """exit_check_start: the rule's test on h_{-1}, the start token's own output,
        before any latent is fed (rows it ends run 0 steps)."""
        s = self.state
        self.exit_test(rule, fed=None, mu=None, mu_next=None, h=s.h[:s.bucket])

    def feed_tokens(self, bound: int) -> None:
        """Feed tok for active rows (adding it to their seen ids); leaves next-token logits in
        state.logits."""
        s = self.state
        Bk = s.bucket
        active = s.active[:Bk]
        s.mark_fed(active)
        out = self.layers(self.adapter.embed_tokens(s.tok[:Bk]), active, bound)
        s.advance(active)
        normed = self.adapter.norm_feedback(out, out=torch.empty_like(out))
        s.logits[:Bk].copy_(self.adapter.lm_head(normed))

    def sample(self, p: TextParams) -> None:
        """Sample tok from state.logits (repetition-penalised over state.seen when the request
        asks for it; state.logits stay the model's); rows that hit a stop id become inactive."""
        s = self.state
        Bk = s.bucket
        active = s.active[:Bk]
        V = s.logits.shape[1]
        tok, lp = sampling.sample(s.logits[:Bk], greedy=p.greedy, temperature=s.temperature,
                                  top_p=s.top_p if p.use_top_p else None, noise=s.noise[:Bk],
                                  penalty=s.penalty if p.use_penalty else None, seen=s.seen[:Bk, :V],
                                  penalty_inverse=s.penalty_inv if self.device.type == "cuda" else None)
        s.tok[:Bk].copy_(torch.where(active, tok, s.pad))
        s.logprob[:Bk].copy_(torch.where(active, lp, torch.zeros_like(lp)))
        s.text_len[:Bk] += active.long()
        # A broadcast compare against the fixed-size stop-id buffer (padded with -1, never
        # a token): no data-dependent path, unlike torch.isin's sort-based variant.
        stopped = (s.tok[:Bk, None] == s.stop_ids[None, :]).any(dim=-1)
        active.logical_and_(~stopped)
