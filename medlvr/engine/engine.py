"""The latent-step decode engine: prefill -> latent segment -> answer text.

    engine = LatentEngine(model, max_batch=8, max_len=2048)
    out = engine.generate(batch, k_max=8, exit="cosine", exit_threshold=0.99,
                          max_new_tokens=64, stop_ids=[im_end], latent_end_id=latent_end)

Layout of one sample's sequence (docs/engine.md):

    prompt ... <|latent_start|> | z_0 z_1 ... z_{n-1} | <|latent_end|> answer ...
                                  latent segment        text decode

- prefill: the HF model itself runs the (left-padded) prompt, with its own attention
  and 3-D positions; its K/V are copied, compacted, into a static cache
  (max_batch, Hkv, max_len, Dh) per layer. The post-norm hidden at <|latent_start|> is
  h_{-1}; the first latent fed is z_0 = feedback(h_{-1}).
- latent step t feeds z_t at the sample's next position (all three mRoPE sections +1)
  and yields h_t (post-final-norm), z_{t+1} = feedback(h_t) (= h_t without a
  projector). So the latent at step t is the hidden state of position s0 + t - 1, s0 the
  first latent position (the mu/z shift of team_interfaces.md).
- text decode feeds <|latent_end|> for every sample at its own position and samples
  answer tokens until a stop id or max_new_tokens.

Every step after prefill runs the decoder layers by hand over the static cache:
input norm -> q/k/v (cuBLAS) -> rotary_append (rope + KV append, Triton on GPU) ->
decode_attention (split-K GQA over per-sample lengths) -> o_proj -> residual ->
post norm -> MLP -> residual, then rmsnorm_feedback writes the next latent input.
On CPU the same code runs the PyTorch references of the three kernels.

State lives in preallocated device buffers (rows [0, B) are the batch, padded to a
bucket for CUDA graphs); per-sample exits and stops are masks over those rows, never
host branches, so on CUDA the whole K-step segment is one captured graph per
(bucket, K, exit rule) and each text step (forward + sampling) is one graph per bucket.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from medlvr.engine import sampling
from medlvr.engine.adapters import adapter_for
from medlvr.engine.cache import StaticKVCache
from medlvr.engine.fused import FusedProjections
from medlvr.engine.graphs import GraphRunner
from medlvr.ops.decode import decode_attention, rmsnorm_feedback, rotary_append

EXITS = ("fixed", "cosine", "stop_logit")
DEFAULT_COSINE_THRESHOLD = 0.99
MAX_STOP_IDS = 16  # stop ids live in a fixed-size device buffer so graphs need no recapture
# Check for "every sample stopped" once per this many text steps on CUDA: each check
# is a host sync, which would otherwise serialise the otherwise asynchronous replays.
_STOP_POLL = 8


@dataclass
class LatentSegment:
    """latents (B, K, D): the inputs z_t fed at latent step t, zero from a sample's exit
    on. latent_hidden (B, K, D): the post-norm hidden states h_{t-1} that produced them
    (equal to latents without a projector). num_latent (B): steps each sample ran."""

    latents: torch.Tensor
    latent_hidden: torch.Tensor
    num_latent: torch.Tensor


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, T) int64, pad after the stop token
    token_logprobs: torch.Tensor  # (B, T) fp32, 0 after the stop token
    text_lengths: torch.Tensor  # (B,) tokens generated, the stop token included
    logits: torch.Tensor | None = None  # (B, T, V) fp32 when asked for, 0 after the stop


@dataclass
class GenerateOutput:
    """See team_interfaces.md. token_logprobs are log-probs of the sampled tokens under
    log_softmax(logits / temperature) (temperature 0: under log_softmax(logits))."""

    latents: torch.Tensor
    latent_hidden: torch.Tensor
    num_latent: torch.Tensor
    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    text_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    logits: torch.Tensor | None = None


def _as_mapping(batch) -> Mapping[str, torch.Tensor]:
    """A dict of model inputs; a medlvr.train collate ``Batch`` is accepted as well."""
    if isinstance(batch, Mapping):
        return batch
    if callable(getattr(batch, "model_inputs", None)):
        return batch.model_inputs()
    raise TypeError(f"batch must be a dict of tensors (or a collate Batch), got {type(batch).__name__}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _token_id(name: str, value, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
    return value


class LatentEngine:
    """Static-cache latent decoding for one HF model (adapter chosen by model_type).

    model: a supported HF causal LM / VLM (see ``supported_model_types()``). The engine
        holds references to its modules, never copies: weights updated in place (an
        optimizer step) are seen by the next call, graphs included; replaced parameter
        tensors need ``reset_graphs()``.
    max_batch / max_len: cache capacity; a call beyond it raises before anything runs.
    dtype: KV cache storage dtype (default: the model's).
    use_cuda_graphs: True, False or "auto" (= on CUDA devices).
    projector: optional callable (B, D) -> (B, D) applied to the post-norm hidden state
        before it is fed back (default: ``model.latent_projector`` if present).
    fuse_projections: run q/k/v and gate/up as one GEMM each from fused weight copies
        (faster small-batch steps, more memory; kept in sync with the model, see
        medlvr/engine/fused.py). Layers wrapped by PEFT/LoRA are left unfused.
    """

    def __init__(self, model: nn.Module, *, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                 use_cuda_graphs: bool | str = "auto",
                 projector: Callable[[torch.Tensor], torch.Tensor] | None = None, fuse_projections: bool = False):
        _positive_int("max_batch", max_batch)
        _positive_int("max_len", max_len)
        self.model = model
        self.adapter = a = adapter_for(model)
        self.device = a.device
        self.dtype = a.dtype if dtype is None else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if use_cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"use_cuda_graphs must be True, False or 'auto', got {use_cuda_graphs!r}")
        if use_cuda_graphs is True and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs=True needs a CUDA model, the model is on {self.device}")
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs == "auto" else use_cuda_graphs
        self.projector = projector if projector is not None else getattr(model, "latent_projector", None)
        self.stop_head = getattr(model, "latent_stop_head", None)
        self.max_batch, self.max_len = max_batch, max_len
        if not isinstance(fuse_projections, bool):
            raise TypeError(f"fuse_projections must be a bool, got {fuse_projections!r}")
        self.fused = FusedProjections(a.layers) if fuse_projections else None
        self.cache = StaticKVCache(num_layers=len(a.layers), max_batch=max_batch, num_kv_heads=a.num_kv_heads,
                                   max_len=max_len, head_dim=a.head_dim, dtype=self.dtype, device=self.device)

        dev, D, V = self.device, a.hidden_size, a.vocab_size
        act = a.dtype
        # Step state; row b < B is sample b of the current batch, rows up to the bucket
        # are inert padding (inactive, length 0).
        self._x = torch.zeros(max_batch, D, dtype=act, device=dev)  # next input embedding z
        self._mu = torch.zeros(max_batch, D, dtype=act, device=dev)  # its mean feedback(h) (z = mu + sigma eps)
        self._h = torch.zeros(max_batch, D, dtype=act, device=dev)  # post-norm hidden that produced _x
        self._len = torch.zeros(max_batch, dtype=torch.long, device=dev)  # valid cache entries
        self._pos = torch.zeros(a.num_position_rows, max_batch, dtype=torch.long, device=dev)  # next position
        self._active = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self._num_latent = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._threshold = torch.zeros((), dtype=torch.float32, device=dev)
        self._sigma = torch.zeros((), dtype=torch.float32, device=dev)
        self._latent_end = torch.zeros(1, dtype=torch.long, device=dev)
        self._tok = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._lp = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self._text_len = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._logits = torch.zeros(max_batch, V, dtype=torch.float32, device=dev)
        self._noise = torch.ones(max_batch, V, dtype=torch.float32, device=dev)
        self._temperature = torch.ones((), dtype=torch.float32, device=dev)
        self._top_p = torch.ones((), dtype=torch.float32, device=dev)
        self._stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=dev)
        self._pad = torch.zeros((), dtype=torch.long, device=dev)
        self._segment_out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graphs = GraphRunner(enabled=self.use_cuda_graphs, device=self.device, state=self._step_state)
        self._batch = 0  # real samples of the current batch (0: no prefill yet)
        self._bucket = 0
        # Upper bound of max(_len), tracked on the host so capacity checks never sync.
        self._host_len = 0

    # ================================================================ public API
    def generate(self, batch: Mapping[str, torch.Tensor], *, k_max: int, exit: str = "fixed",
                 exit_threshold: float | None = None, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: Sequence[int] = (), latent_end_id: int | None = None,
                 generator: torch.Generator | None = None, pad_id: int | None = None,
                 return_logits: bool = False, latent_noise_std: float = 0.0) -> GenerateOutput:
        """Prefill -> latent segment of up to k_max steps -> answer of up to
        max_new_tokens tokens, for a left-padded batch of prompts ending with
        <|latent_start|> (see team_interfaces.md). With k_max == 0 there is no latent
        segment and no <|latent_end|> is fed: the answer follows the prompt directly."""
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 0:
            raise ValueError(f"k_max must be an int >= 0, got {k_max!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        V = self.adapter.vocab_size
        if k_max > 0:
            if latent_end_id is None:
                raise ValueError("latent_end_id is required when k_max > 0 (it is fed after the latent segment)")
            _token_id("latent_end_id", latent_end_id, V)
        self._check_exit(exit, exit_threshold, latent_end_id)
        self._check_sampling(temperature, top_p, stop_ids, pad_id)
        self._check_noise(latent_noise_std, generator)
        batch = _as_mapping(batch)
        self.adapter.check_batch(batch)
        B = batch["input_ids"].shape[0]
        self._check_batch_size(B)
        prompt_max = int(batch["attention_mask"].long().sum(-1).max())
        first = latent_end_id if k_max > 0 else None
        need = prompt_max + k_max + self._text_feeds(max_new_tokens, first)
        if need > self.max_len:
            raise ValueError(f"sequence too long for the cache: longest prompt {prompt_max} + k_max {k_max} + "
                             f"{self._text_feeds(max_new_tokens, first)} fed text tokens = {need} > max_len "
                             f"{self.max_len}")

        prompt_lengths = self.prefill(batch)
        seg = self.latent_segment(k_max, exit=exit, exit_threshold=exit_threshold, latent_end_id=latent_end_id,
                                  latent_noise_std=latent_noise_std, generator=generator)
        text = self.decode_text(max_new_tokens, first_token=first, temperature=temperature, top_p=top_p,
                                stop_ids=stop_ids, pad_id=pad_id, generator=generator, return_logits=return_logits)
        return GenerateOutput(latents=seg.latents, latent_hidden=seg.latent_hidden, num_latent=seg.num_latent,
                              tokens=text.tokens, token_logprobs=text.token_logprobs, text_lengths=text.text_lengths,
                              prompt_lengths=prompt_lengths, logits=text.logits)

    def prefill(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the HF model over the left-padded prompts, fill the static cache, set
        each sample's next position and first latent input. Returns prompt lengths (B)."""
        a = self.adapter
        batch = _as_mapping(batch)
        a.check_batch(batch)
        B = batch["input_ids"].shape[0]
        self._check_batch_size(B)
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        n_max = int(batch["attention_mask"].long().sum(-1).max())
        if n_max > self.max_len or batch["input_ids"].shape[1] > self.max_len:
            raise ValueError(f"prompt of {batch['input_ids'].shape[1]} tokens ({n_max} unpadded) does not fit "
                             f"max_len {self.max_len}")
        with self._inference():
            pre = a.prefill(batch)
            Bk = self._bucket_for(B)
            self._reset_state()
            self.cache.load_prompt(pre.keys, pre.values, pre.lengths)
            self._len[:B].copy_(pre.lengths)
            self._pos[:, :B].copy_(pre.next_positions)
            self._h[:B].copy_(pre.hidden)
            self._mu[:B].copy_(self.projector(pre.hidden) if self.projector is not None else pre.hidden)
            self._x[:B].copy_(self._mu[:B])
            self._active[:B] = True
        self._batch, self._bucket, self._host_len = B, Bk, n_max
        return pre.lengths.clone()

    def latent_segment(self, k_max: int, *, exit: str = "fixed", exit_threshold: float | None = None,
                       latent_end_id: int | None = None, latent_noise_std: float = 0.0,
                       generator: torch.Generator | None = None) -> LatentSegment:
        """Run up to k_max latent steps from the current state (after ``prefill``).

        exit rules, per sample, evaluated after each step t on its output h_t:
          "fixed": every sample runs k_max steps.
          "cosine": stop when cos(z_{t+1}, z_t) > exit_threshold (default 0.99):
              successive latents have converged, z_{t+1} is not fed.
          "stop_logit": stop when the model would emit <|latent_end|> next: with a
              ``latent_stop_head`` on the model, when its logit > exit_threshold (default
              0); else when lm_head(h_t)[latent_end_id] > exit_threshold, or, with no
              threshold, when it is the argmax of lm_head(h_t) (a full V x D read per step).
        Every sample runs at least one step when k_max > 0.

        latent_noise_std: VLPO's latent exploration. The fed latent is
        z_t = mu_t + latent_noise_std * eps_t, eps_t ~ N(0, I) drawn from ``generator``,
        with mu_t = feedback(h_{t-1}) the deterministic latent; ``latents`` returns the z_t
        actually fed, ``latent_hidden`` the h_{t-1}. The cosine rule compares successive
        means mu (noise would mask convergence).
        """
        self._require_prefill()
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 0:
            raise ValueError(f"k_max must be an int >= 0, got {k_max!r}")
        mode = self._check_exit(exit, exit_threshold, latent_end_id)
        self._check_noise(latent_noise_std, generator)
        noisy = latent_noise_std > 0
        B, Bk = self._batch, self._bucket
        D = self.adapter.hidden_size
        if k_max == 0:
            empty = torch.zeros(B, 0, D, dtype=self._x.dtype, device=self.device)
            return LatentSegment(empty, empty.clone(), torch.zeros(B, dtype=torch.long, device=self.device))
        if self._host_len + k_max > self.max_len:
            raise ValueError(f"k_max {k_max} latent steps after {self._host_len} cached positions exceed max_len "
                             f"{self.max_len}")
        if (Bk, k_max) not in self._segment_out:
            self._segment_out[(Bk, k_max)] = tuple(torch.zeros(Bk, k_max, D, dtype=self._x.dtype, device=self.device)
                                                   for _ in range(3))
        lat, hid, eps = self._segment_out[(Bk, k_max)]
        self._sigma.fill_(float(latent_noise_std))
        if noisy:
            # Drawn outside the graph, from the caller's generator: reproducible per seed.
            eps.normal_(generator=generator)
        self._active[:B] = True
        self._num_latent.zero_()
        if exit_threshold is not None:
            self._threshold.fill_(float(exit_threshold))
        elif exit == "cosine":
            self._threshold.fill_(DEFAULT_COSINE_THRESHOLD)
        else:
            self._threshold.fill_(0.0)
        if latent_end_id is not None:
            self._latent_end.fill_(latent_end_id)

        def segment():
            # A segment starts from the current mean: z_0 = mu_0 (+ noise).
            self._x[:Bk].copy_(self._feed(self._mu[:Bk], eps[:, 0]) if noisy else self._mu[:Bk])
            for t in range(k_max):
                self._latent_step(t, Bk, mode, lat, hid, eps if noisy else None)

        with self._inference():
            self._graphs.run(("latent", Bk, k_max, mode, noisy), segment)
        self._host_len += k_max
        return LatentSegment(lat[:B].clone(), hid[:B].clone(), self._num_latent[:B].clone())

    def decode_text(self, max_new_tokens: int, *, first_token: int | None = None, temperature: float = 0.0,
                    top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int | None = None,
                    generator: torch.Generator | None = None, return_logits: bool = False) -> TextOutput:
        """Sample up to max_new_tokens tokens per sample from the current state.

        first_token: a token fed to every sample before the first sample (the
        <|latent_end|> after a latent segment); None: the first token is sampled from the
        current hidden state (the prompt's last token right after ``prefill``, or each
        sample's last latent position after a segment).
        temperature 0: greedy; > 0: sampling from softmax(logits / T), top_p < 1 restricts
        it to the nucleus. stop_ids: a sample stops after emitting one (it is kept, its
        log-prob counted); later positions hold pad_id (default: stop_ids[0], else 0).
        generator: the source of the sampling noise (same device as the model).
        """
        self._require_prefill()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        V = self.adapter.vocab_size
        if first_token is not None:
            _token_id("first_token", first_token, V)
        self._check_sampling(temperature, top_p, stop_ids, pad_id)
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator must be on the model's device type {self.device.type}, "
                             f"got {generator.device}")
        feeds = self._text_feeds(max_new_tokens, first_token)
        if self._host_len + feeds > self.max_len:
            raise ValueError(f"{max_new_tokens} new tokens ({feeds} fed) after {self._host_len} cached positions "
                             f"exceed max_len {self.max_len}")
        B, Bk, T = self._batch, self._bucket, max_new_tokens
        stops = [int(s) for s in stop_ids]
        pad = pad_id if pad_id is not None else (stops[0] if stops else 0)
        greedy = temperature == 0
        use_top_p = not greedy and top_p < 1.0
        self._stop_ids.fill_(-1)
        if stops:
            self._stop_ids[:len(stops)] = torch.tensor(stops, dtype=torch.long)
        self._pad.fill_(pad)
        self._temperature.fill_(float(temperature) if not greedy else 1.0)
        self._top_p.fill_(float(top_p))
        self._active[:B] = True
        self._text_len.zero_()

        tokens = torch.full((B, T), pad, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(B, T, dtype=torch.float32, device=self.device)
        logits_out = torch.zeros(B, T, V, dtype=torch.float32, device=self.device) if return_logits else None

        def draw_noise():
            if not greedy:
                self._noise[:Bk].exponential_(generator=generator)

        fed = [0]

        def text_step():
            self._feed_tokens(Bk, self._host_len + fed[0] + 1)
            self._sample(Bk, greedy, use_top_p)

        with self._inference():
            start = 0
            if first_token is None and T > 0:
                self._logits[:Bk].copy_(self.adapter.lm_head(self._h[:Bk]))
                draw_noise()
                self._sample(Bk, greedy, use_top_p)
                self._record(0, tokens, logprobs, logits_out)
                start = 1
            elif first_token is not None:
                self._tok[:B] = first_token
            for t in range(start, T):
                if self.device.type == "cpu" or (t - start) % _STOP_POLL == 0:
                    if t > 0 and not bool(self._active[:B].any()):
                        break
                draw_noise()
                self._graphs.run(("text", Bk, greedy, use_top_p), text_step)
                fed[0] += 1
                self._record(t, tokens, logprobs, logits_out)
        self._host_len += feeds
        text_lengths = self._text_len[:B].clone()
        if logits_out is not None:
            logits_out *= (torch.arange(T, device=self.device)[None, :] < text_lengths[:, None])[..., None]
        return TextOutput(tokens=tokens, token_logprobs=logprobs, text_lengths=text_lengths, logits=logits_out)

    def refresh_weights(self) -> None:
        """Re-copy fused projection weights from the model (only needed after writes
        through ``param.data``; other in-place updates are detected)."""
        if self.fused is not None:
            self.fused.refresh(force=True)

    def reset_graphs(self) -> None:
        """Drop captured CUDA graphs (needed after parameters are replaced, not updated in place)."""
        self._graphs.reset()

    # ================================================================ one decode step
    def _layers(self, x: torch.Tensor, active: torch.Tensor, bound: int) -> torch.Tensor:
        """All decoder layers for one token per row over the static cache. Rows with
        ``active`` append their K/V at slot _len[b]; the others write nothing.

        bound: a host-known upper bound of max(_len) + 1 for this step. On CPU the cache
        is handed to the ops cut to it: the PyTorch references read every position they
        are given, so without the cut each step would cost O(max_len), not O(length).
        On CUDA the kernels skip positions past each length themselves, and a captured
        graph needs fixed shapes, so the full cache is passed."""
        a = self.adapter
        cut = slice(None) if self.device.type != "cpu" else slice(0, min(bound, self.max_len))
        Bk = x.shape[0]
        lengths = self._len[:Bk]
        slots = torch.where(active, lengths, torch.full_like(lengths, -1))
        attn_len = lengths + active.long()  # the step's own key included
        pos = self._pos[:, :Bk] if a.mrope_section is not None else self._pos[0, :Bk]
        h = x
        for i, layer in enumerate(a.layers):
            eps_in, eps_post = a.layer_eps[i]
            normed = rmsnorm_feedback(h, layer.input_norm.weight, eps=eps_in, out=torch.empty_like(h))
            fused = self.fused.layers[i] if self.fused is not None else None
            if fused is not None:
                q, k, v = fused.qkv(normed)
            else:
                q, k, v = layer.q_proj(normed), layer.k_proj(normed), layer.v_proj(normed)
            q = q.view(Bk, a.num_heads, a.head_dim)
            k = k.view(Bk, a.num_kv_heads, a.head_dim)
            v = v.view(Bk, a.num_kv_heads, a.head_dim)
            k_cache, v_cache = self.cache.k[i][:, :, cut], self.cache.v[i][:, :, cut]
            q = rotary_append(q, k, v, positions=pos, inv_freq=a.inv_freq, mrope_section=a.mrope_section,
                              k_cache=k_cache, v_cache=v_cache, slots=slots, rotary_dim=a.rotary_dim)
            o = decode_attention(q, k_cache, v_cache, attn_len, scale=a.attn_scale)
            h = h + layer.o_proj(o.reshape(Bk, a.num_heads * a.head_dim))
            normed = rmsnorm_feedback(h, layer.post_norm.weight, eps=eps_post, out=torch.empty_like(h))
            h = h + (fused.mlp(normed) if fused is not None else layer.mlp(normed))
        return h

    def _advance(self, Bk: int, active: torch.Tensor) -> None:
        step = active.long()
        self._len[:Bk] += step
        self._pos[:, :Bk] += step

    def _feed(self, mu: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (mu.float() + self._sigma * eps.float()).to(mu.dtype)

    def _latent_step(self, t: int, Bk: int, mode: str, lat: torch.Tensor, hid: torch.Tensor,
                     eps: torch.Tensor | None) -> None:
        x, mu, h, active = self._x[:Bk], self._mu[:Bk], self._h[:Bk], self._active[:Bk]
        keep = active[:, None]
        lat[:, t].copy_(x.masked_fill(~keep, 0))
        hid[:, t].copy_(h.masked_fill(~keep, 0))
        out = self._layers(x, active, self._host_len + t + 1)
        self._num_latent[:Bk] += active.long()
        self._advance(Bk, active)
        prev = mu.clone()
        # Exited rows keep their last state: after the segment _mu/_h (and _x) hold each
        # sample's state at its own last position.
        normed = rmsnorm_feedback(out, self.adapter.norm.weight, eps=self.adapter.norm_eps, out=mu, active=active,
                                  projector=self.projector)
        if self.projector is None:
            h.copy_(mu)
        else:
            h.copy_(torch.where(keep, normed.to(h.dtype), h))
        if t + 1 < lat.shape[1]:  # the last step's output is not fed as a latent
            nxt = self._feed(mu, eps[:, t + 1]) if eps is not None else mu
            x.copy_(torch.where(keep, nxt, x))
        stop = self._stop_rule(mode, mu, prev, h)
        if stop is not None:
            active.logical_and_(~stop)

    def _stop_rule(self, mode: str, mu_next: torch.Tensor, mu: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        if mode == "fixed":
            return None
        if mode == "cosine":
            return F.cosine_similarity(mu_next.float(), mu.float(), dim=-1) > self._threshold
        if mode == "head":
            return self.stop_head(h).float().reshape(-1) > self._threshold
        head = self.adapter.lm_head
        if mode == "logit":
            # One vocabulary row, not the whole lm_head.
            logit = F.linear(h, head.weight.index_select(0, self._latent_end)).float().squeeze(-1)
            if getattr(head, "bias", None) is not None:
                logit = logit + head.bias.index_select(0, self._latent_end).float()
            return logit > self._threshold
        return head(h).float().argmax(dim=-1) == self._latent_end  # mode "argmax"

    def _feed_tokens(self, Bk: int, bound: int) -> None:
        """Feed _tok for active rows; leaves next-token logits in _logits."""
        active = self._active[:Bk]
        x = self.adapter.embed_tokens(self._tok[:Bk])
        out = self._layers(x, active, bound)
        self._advance(Bk, active)
        normed = rmsnorm_feedback(out, self.adapter.norm.weight, eps=self.adapter.norm_eps, out=torch.empty_like(out))
        self._logits[:Bk].copy_(self.adapter.lm_head(normed))

    def _sample(self, Bk: int, greedy: bool, use_top_p: bool) -> None:
        active = self._active[:Bk]
        tok, lp = sampling.sample(self._logits[:Bk], greedy=greedy, temperature=self._temperature,
                                  top_p=self._top_p if use_top_p else None, noise=self._noise[:Bk])
        self._tok[:Bk].copy_(torch.where(active, tok, self._pad))
        self._lp[:Bk].copy_(torch.where(active, lp, torch.zeros_like(lp)))
        self._text_len[:Bk] += active.long()
        # A broadcast compare against the fixed-size stop-id buffer (padded with -1, never
        # a token): no data-dependent path, unlike torch.isin's sort-based variant.
        stopped = (self._tok[:Bk, None] == self._stop_ids[None, :]).any(dim=-1)
        active.logical_and_(~stopped)

    def _record(self, t: int, tokens: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor | None) -> None:
        B = tokens.shape[0]
        tokens[:, t].copy_(self._tok[:B])
        logprobs[:, t].copy_(self._lp[:B])
        if logits is not None:
            logits[:, t].copy_(self._logits[:B])

    # ================================================================ helpers
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        # no_grad, not inference_mode: latents are later fed to differentiable training
        # forwards, which must be able to save them. eval() switches off dropout (LoRA's
        # included); the caller's train/eval flags are restored afterwards.
        # Autocast off: the engine runs in the weights' dtype (its static cache and kernels
        # take one dtype per call); an ambient autocast (VLPO's training region) would hand
        # the kernels bf16 activations beside an fp32 cache.
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        if self.fused is not None:
            self.fused.refresh()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                yield
        finally:
            for m, training in flags:
                m.training = training

    def _bucket_for(self, B: int) -> int:
        if not self.use_cuda_graphs:
            return B
        bucket = 1
        while bucket < B:
            bucket *= 2
        return min(bucket, self.max_batch)

    def _step_state(self) -> list[torch.Tensor]:
        """The buffers a step mutates (besides the KV cache and per-call outputs)."""
        return [self._x, self._mu, self._h, self._len, self._pos, self._active, self._num_latent, self._tok,
                self._lp, self._text_len, self._logits]

    def _reset_state(self) -> None:
        for buf in self._step_state():
            buf.zero_()

    def _check_batch_size(self, B: int) -> None:
        if B < 1 or B > self.max_batch:
            raise ValueError(f"batch size must be in [1, max_batch={self.max_batch}], got {B}")

    def _require_prefill(self) -> None:
        if self._batch == 0:
            raise RuntimeError("call prefill(batch) (or generate) before latent_segment / decode_text")

    def _check_exit(self, exit: str, threshold: float | None, latent_end_id: int | None) -> str:
        """Validate an exit rule; returns the step's mode key."""
        if exit not in EXITS:
            raise ValueError(f"exit must be one of {EXITS}, got {exit!r}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError(f"exit_threshold must be a float or None, got {threshold!r}")
        if exit == "fixed":
            return "fixed"
        if exit == "cosine":
            if threshold is not None and not -1.0 <= threshold <= 1.0:
                raise ValueError(f"exit_threshold for exit='cosine' must lie in [-1, 1], got {threshold}")
            return "cosine"
        if self.stop_head is not None:
            return "head"
        if latent_end_id is None:
            raise ValueError("exit='stop_logit' needs latent_end_id (or a latent_stop_head on the model)")
        _token_id("latent_end_id", latent_end_id, self.adapter.vocab_size)
        return "argmax" if threshold is None else "logit"

    def _check_noise(self, std, generator) -> None:
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ValueError(f"latent_noise_std must be a float >= 0, got {std!r}")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator must be on the model's device type {self.device.type}, "
                             f"got {generator.device}")

    def _check_sampling(self, temperature, top_p, stop_ids, pad_id) -> None:
        V = self.adapter.vocab_size
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
        if isinstance(stop_ids, torch.Tensor):
            stop_ids = stop_ids.tolist()
        stop_ids = list(stop_ids)
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"stop_ids may hold at most {MAX_STOP_IDS} ids, got {len(stop_ids)}")
        for s in stop_ids:
            _token_id("stop_ids entries", s, V)
        if pad_id is not None:
            _token_id("pad_id", pad_id, V)

    @staticmethod
    def _text_feeds(max_new_tokens: int, first_token: int | None) -> int:
        """Cache positions decode_text writes: the first token (if fed) and every
        sampled token but the last."""
        if max_new_tokens == 0:
            return 0
        return max_new_tokens if first_token is not None else max_new_tokens - 1
