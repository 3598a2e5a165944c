"""The latent-step decode engine: prefill -> latent segment -> answer text.

    engine = LatentEngine(model, max_batch=8, max_len=2048)
    out = engine.generate(batch, k_max=8, exit="cosine", exit_threshold=0.99,
                          max_new_tokens=64, stop_ids=[im_end], latent_end_id=latent_end)

Layout of one sample's sequence (docs/engine.md):

    prompt ... <|latent_start|> | z_0 z_1 ... z_{n-1} | <|latent_end|> answer ...
                                  latent segment        text decode

- prefill: the HF model itself runs the (left-padded) prompt, with its own attention and 3-D
  positions; its K/V are copied, compacted, into a static cache (max_batch, Hkv, max_len, Dh) per
  layer. The post-norm hidden at <|latent_start|> is h_{-1}; the first latent fed is z_0 = feedback(h_{-1}).
- latent step t feeds z_t at the sample's next position (all three mRoPE sections +1) and yields
  h_t (post-final-norm), z_{t+1} = feedback(h_t) (= h_t without a projector). So the latent at step
  t is the hidden state of position s0 + t - 1, s0 the first latent position (the mu/z shift, docs/engine.md).
- text decode feeds <|latent_end|> for every sample at its own position and samples answer tokens
  until a stop id or max_new_tokens.

Every step after prefill runs the decoder layers by hand over the static cache: input norm -> q/k/v
(cuBLAS) -> rotary_append (rope + KV append, Triton on GPU) -> decode_attention (split-K GQA over
per-sample lengths) -> o_proj -> residual -> post norm -> MLP -> residual, then rmsnorm_feedback
writes the next latent input. On CPU the same code runs the PyTorch references of the three kernels.

State lives in preallocated device buffers (medlvr/engine/state.py: rows [0, B) are the batch,
padded to a bucket for CUDA graphs); per-sample exits and stops are masks over those rows, never host
branches, so on CUDA the whole K-step segment is one captured graph per (bucket, K, exit rule) and
each text step (forward + sampling, with or without the repetition penalty) is one graph per bucket.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from medlvr.engine.adapters import adapter_for
from medlvr.engine.cache import StaticKVCache
from medlvr.engine.fused import FusedProjections
from medlvr.engine.graphs import GraphRunner
from medlvr.engine.request import (FROM_SEGMENT, GenerateOutput, LatentSegment, SegmentParams, TextOutput, TextParams,
                                   as_mapping, check_generator, checked_batch, non_negative_int, positive_int)
from medlvr.engine.state import DecodeState
from medlvr.engine.step import DecodeStep

# Check for "every sample stopped" once per this many text steps on CUDA: each check
# is a host sync, which would otherwise serialise the otherwise asynchronous replays.
_STOP_POLL = 8


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
        project_first=False: the first latent is the prompt's hidden state itself;
        projector_logits=True: inside the segment the exit tests and the first answer token
        read the projected state (LVR's lvr_head: not on the first latent, and its output
        also feeds lm_head).
    fuse_projections: run q/k/v and gate/up as one GEMM each from fused weight copies
        (faster small-batch steps, more memory; kept in sync with the model, see
        medlvr/engine/fused.py). Layers wrapped by PEFT/LoRA are left unfused.
    max_prompts / max_prompt_len: a shared prompt cache for grouped generation
        (``generate(..., group_size=G)``, medlvr/engine/group.py): up to max_prompts
        prompts of up to max_prompt_len (default max_len) tokens, each prefilled and stored
        once for its G rows; the rows' own cache (max_batch x max_len) then holds only
        latents + answer. 0 (default): no prompt cache, independent rows only.
    """

    def __init__(self, model: nn.Module, *, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                 use_cuda_graphs: bool | str = "auto",
                 projector: Callable[[torch.Tensor], torch.Tensor] | None = None, fuse_projections: bool = False,
                 max_prompts: int = 0, max_prompt_len: int | None = None, project_first: bool = True,
                 projector_logits: bool = False):
        positive_int("max_batch", max_batch)
        positive_int("max_len", max_len)
        non_negative_int("max_prompts", max_prompts)
        self.max_prompts = max_prompts
        self.max_prompt_len = max_len if max_prompt_len is None else positive_int("max_prompt_len", max_prompt_len)
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
        for name, flag in (("project_first", project_first), ("projector_logits", projector_logits)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.project_first, self.projector_logits = project_first, projector_logits
        self.stop_head = getattr(model, "latent_stop_head", None)
        self.max_batch, self.max_len = max_batch, max_len
        if not isinstance(fuse_projections, bool):
            raise TypeError(f"fuse_projections must be a bool, got {fuse_projections!r}")
        if a.max_positions is not None and max_len > a.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the model's {a.max_positions} learned positions "
                             "(config.n_positions)")
        self.fused = FusedProjections(a.layers) if fuse_projections else None
        self.cache = StaticKVCache(num_layers=len(a.layers), max_batch=max_batch, num_kv_heads=a.num_kv_heads,
                                   max_len=max_len, head_dim=a.head_dim, dtype=self.dtype, device=self.device)
        self.prefix = None if max_prompts == 0 else StaticKVCache(
            num_layers=len(a.layers), max_batch=max_prompts, num_kv_heads=a.num_kv_heads,
            max_len=self.max_prompt_len, head_dim=a.head_dim, dtype=self.dtype, device=self.device)

        self.state = DecodeState(max_batch=max_batch, hidden_size=a.hidden_size, vocab_size=a.vocab_size,
                                 position_rows=a.num_position_rows, dtype=a.dtype, device=self.device,
                                 bucketed=self.use_cuda_graphs)
        self._graphs = GraphRunner(enabled=self.use_cuda_graphs, device=self.device, state=self.state.mutable)
        self.step = DecodeStep(adapter=a, cache=self.cache, prefix=self.prefix, state=self.state, fused=self.fused,
                               projector=self.projector, stop_head=self.stop_head,
                               projector_logits=projector_logits)

    # ================================================================ public API
    def generate(self, batch: Mapping[str, torch.Tensor], *, k_max: int, exit: str = "fixed",
                 exit_threshold: float | None = None, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: Sequence[int] = (), latent_end_id: int | None = None,
                 generator: torch.Generator | None = None, pad_id: int | None = None,
                 return_logits: bool = False, latent_noise_std: float = 0.0, exit_scope: str = "sample",
                 end_embedding: torch.Tensor | None = None,
                 latent_counts: Sequence[int] | torch.Tensor | None = None,
                 group_size: int | None = None, exit_distance: str = "mse", exit_distance_on: str = "fed",
                 exit_check_start: bool = False, after_exit: str = "end_token", latent_pad_id: int | None = None,
                 stop_first: bool = True, repetition_penalty: float = 1.0) -> GenerateOutput:
        """Prefill -> latent segment of up to k_max steps -> answer of up to
        max_new_tokens tokens, for a left-padded batch of prompts ending with
        <|latent_start|> (docs/engine.md). With k_max == 0 there is no latent
        segment and no <|latent_end|> is fed: the answer follows the prompt directly.
        The exit arguments (exit, exit_threshold, exit_scope, end_embedding, latent_counts,
        exit_distance, exit_distance_on, exit_check_start, after_exit, latent_pad_id) are those
        of ``latent_segment``; after_exit says what the answer starts from (the end token,
        the model's own next token, or Mirage's per-row tokens). stop_first, repetition_penalty:
        as in ``decode_text``. group_size=G: G rows per prompt (row p * G + j), the
        prompt prefilled and cached once (needs max_prompts > 0); every output has P * G rows,
        and they equal the rows of the prompts repeated G times given the same generator.
        Every argument is checked once, here, before anything runs."""
        V = self.adapter.vocab_size
        if isinstance(k_max, int) and not isinstance(k_max, bool) and k_max > 0 and latent_end_id is None \
                and after_exit == "end_token":
            raise ValueError("latent_end_id is required when k_max > 0 (it is fed after the latent segment)")
        ids = as_mapping(batch).get("input_ids")
        seg = SegmentParams.checked(k_max, exit=exit, exit_threshold=exit_threshold, latent_end_id=latent_end_id,
                                    latent_noise_std=latent_noise_std, vocab=V,
                                    has_stop_head=self.stop_head is not None, exit_scope=exit_scope,
                                    end_embedding=end_embedding, latent_counts=latent_counts,
                                    batch=ids.shape[0] if isinstance(ids, torch.Tensor) else None,
                                    hidden_size=self._latent_size(), exit_distance=exit_distance,
                                    exit_distance_on=exit_distance_on, exit_check_start=exit_check_start,
                                    after_exit=after_exit, latent_pad_id=latent_pad_id)
        first = None
        if k_max > 0 or seg.rule.check_start:
            first = {"end_token": latent_end_id, "model": None, "mirage": FROM_SEGMENT}[seg.rule.after]
        text = TextParams.checked(max_new_tokens, first_token=first, temperature=temperature, top_p=top_p,
                                  stop_ids=stop_ids, pad_id=pad_id, return_logits=return_logits, vocab=V,
                                  stop_first=stop_first, repetition_penalty=repetition_penalty)
        check_generator(generator, self.device)
        batch, prompt_max = checked_batch(batch, self, group_size)
        own_prompt = prompt_max if group_size is None else 0  # grouped: the prompt is in the shared prompt cache
        need = own_prompt + k_max + text.feeds
        if need > self.max_len:
            raise ValueError(f"sequence too long for the cache: prompt {own_prompt} + k_max {k_max} + "
                             f"{text.feeds} fed text tokens = {need} > max_len {self.max_len}")
        prompt_lengths = self._prefill(batch, prompt_max, group_size)
        lat, answer = self._segment(seg, generator), self._decode(text, generator)
        return GenerateOutput(latents=lat.latents, latent_hidden=lat.latent_hidden, num_latent=lat.num_latent,
                              tokens=answer.tokens, token_logprobs=answer.token_logprobs,
                              text_lengths=answer.text_lengths, prompt_lengths=prompt_lengths, logits=answer.logits)

    def prefill(self, batch: Mapping[str, torch.Tensor], *, group_size: int | None = None) -> torch.Tensor:
        """Run the HF model over the left-padded prompts, fill the static cache, set each sample's next
        position and first latent input. Returns prompt lengths: (B), or (P * G) with group_size=G."""
        return self._prefill(*checked_batch(batch, self, group_size), group_size)

    def latent_segment(self, k_max: int, *, exit: str = "fixed", exit_threshold: float | None = None,
                       latent_end_id: int | None = None, latent_noise_std: float = 0.0,
                       generator: torch.Generator | None = None, exit_scope: str = "sample",
                       end_embedding: torch.Tensor | None = None,
                       latent_counts: Sequence[int] | torch.Tensor | None = None, exit_distance: str = "mse",
                       exit_distance_on: str = "fed", exit_check_start: bool = False,
                       after_exit: str = "end_token", latent_pad_id: int | None = None) -> LatentSegment:
        """Run up to k_max latent steps from the current state (after ``prefill``).

        Exit rules (exit, exit_threshold, exit_scope, exit_distance, exit_distance_on,
        exit_check_start, end_embedding, latent_counts; after_exit / latent_pad_id say what
        ``generate`` feeds next) are defined, with their defaults, in
        medlvr/engine/exit_rules.py; docs/engine.md lists them. Per-row exits are masks.

        latent_noise_std: VLPO's latent exploration. The fed latent is
        z_t = mu_t + latent_noise_std * eps_t, eps_t ~ N(0, I) drawn from ``generator``,
        with mu_t = feedback(h_{t-1}) the deterministic latent; ``latents`` returns the z_t
        actually fed, ``latent_hidden`` the h_{t-1}. The cosine rule compares successive
        means mu (noise would mask convergence).
        """
        self._require_prefill()
        seg = SegmentParams.checked(k_max, exit=exit, exit_threshold=exit_threshold, latent_end_id=latent_end_id,
                                    latent_noise_std=latent_noise_std, vocab=self.adapter.vocab_size,
                                    has_stop_head=self.stop_head is not None, exit_scope=exit_scope,
                                    end_embedding=end_embedding, latent_counts=latent_counts,
                                    batch=self.state.batch, hidden_size=self._latent_size(),
                                    exit_distance=exit_distance, exit_distance_on=exit_distance_on,
                                    exit_check_start=exit_check_start, after_exit=after_exit,
                                    latent_pad_id=latent_pad_id)
        check_generator(generator, self.device)
        if self.state.host_len + k_max > self.max_len:
            raise ValueError(f"k_max {k_max} latent steps after {self.state.host_len} cached positions exceed "
                             f"max_len {self.max_len}")
        return self._segment(seg, generator)

    def decode_text(self, max_new_tokens: int, *, first_token: int | None = None, temperature: float = 0.0,
                    top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int | None = None,
                    generator: torch.Generator | None = None, return_logits: bool = False,
                    repetition_penalty: float = 1.0) -> TextOutput:
        """Sample up to max_new_tokens tokens per sample from the current state.

        first_token: a token fed to every sample before the first sample (the
        <|latent_end|> after a latent segment); None: the first token is sampled from the
        current hidden state (the prompt's last token right after ``prefill``, or each
        sample's last latent position after a segment).
        temperature 0: greedy; > 0: sampling from softmax(logits / T), top_p < 1 restricts
        it to the nucleus. stop_ids: a sample stops after emitting one (it is kept, its
        log-prob counted); later positions hold pad_id (default: stop_ids[0], else 0).
        generator: the source of the sampling noise (same device as the model).
        repetition_penalty: HF's, before temperature / top-p, over the ids in each row's cache (the
        prompt, every token fed since; docs/engine.md); token_logprobs read the penalised logits.
        """
        self._require_prefill()
        text = TextParams.checked(max_new_tokens, first_token=first_token, temperature=temperature, top_p=top_p,
                                  stop_ids=stop_ids, pad_id=pad_id, return_logits=return_logits,
                                  vocab=self.adapter.vocab_size, repetition_penalty=repetition_penalty)
        check_generator(generator, self.device)
        if self.state.host_len + text.feeds > self.max_len:
            raise ValueError(f"{max_new_tokens} new tokens ({text.feeds} fed) after {self.state.host_len} cached "
                             f"positions exceed max_len {self.max_len}")
        return self._decode(text, generator)

    def refresh_weights(self) -> None:
        """Re-copy fused projection weights from the model (only needed after writes
        through ``param.data``; other in-place updates are detected)."""
        if self.fused is not None:
            self.fused.refresh(force=True)

    def reset_graphs(self) -> None:
        """Drop captured CUDA graphs (needed after parameters are replaced, not updated in place)."""
        self._graphs.reset()

    # ================================================================ the three phases (arguments checked)
    def _prefill(self, batch: Mapping[str, torch.Tensor], host_len: int, group_size: int | None = None) -> torch.Tensor:
        """host_len: the longest unpadded prompt, as checked_batch read it (no second read)."""
        with self._inference():
            pre = self.adapter.prefill(batch)
            project = self.projector is not None and self.project_first
            mu = self.projector(pre.hidden) if project else pre.hidden
            if group_size is None:
                self.cache.load_prompt(pre.keys, pre.values, pre.lengths)
                self.state.start(batch["input_ids"].shape[0], lengths=pre.lengths, prompt=batch,
                                 next_positions=pre.next_positions, hidden=pre.hidden, mu=mu, host_len=host_len)
                return pre.lengths.clone()
            # Grouped: the prompt's K/V once in the prefix cache; each of its G rows starts
            # with an empty own cache at the prompt's next position.
            G = group_size
            self.prefix.load_prompt(pre.keys, pre.values, pre.lengths)
            rows = pre.lengths.shape[0] * G
            self.state.start(rows, lengths=torch.zeros(rows, dtype=torch.long, device=self.device),
                             next_positions=pre.next_positions.repeat_interleave(G, dim=1),
                             hidden=pre.hidden.repeat_interleave(G, dim=0), mu=mu.repeat_interleave(G, dim=0),
                             host_len=0, prompt=batch, repeat=G)
            self.state.share_prefix(G, pre.lengths, host_len)
        return pre.lengths.repeat_interleave(G)

    def _segment(self, p: SegmentParams, generator: torch.Generator | None) -> LatentSegment:
        s, k, rule = self.state, p.k_max, p.rule
        B, Bk = s.batch, s.bucket
        s.num_latent.zero_()
        if k == 0 and not rule.check_start:
            empty = s.x.new_zeros(B, 0, s.x.shape[1])
            return LatentSegment(empty, empty.clone(), torch.zeros(B, dtype=torch.long, device=self.device))
        lat, hid, eps = s.segment_buffers(k)
        noisy = p.noise_std > 0 and k > 0
        s.sigma.fill_(p.noise_std)
        if noisy:
            eps.normal_(generator=generator)  # drawn outside the graph, from the caller's generator
        s.active[:B] = True
        if rule.counts is not None:  # host ints, copied outside the graph
            s.k_row.zero_()
            s.k_row[:B].copy_(torch.tensor(rule.counts, dtype=torch.long))
            s.active[:B] = s.k_row[:B] > 0
        if rule.end_embedding is not None:
            s.end_emb.copy_(rule.end_embedding)
        s.fired_count.zero_()
        s.batch_size.fill_(B)
        s.threshold.fill_(rule.threshold)
        if p.latent_end_id is not None:
            s.latent_end.fill_(p.latent_end_id)
            s.tok[:B] = p.latent_end_id  # after_exit "mirage": a k_max exit feeds the end token
        if rule.latent_pad_id is not None:
            s.latent_pad.fill_(rule.latent_pad_id)

        def segment():
            if rule.check_start:
                self.step.start_test(rule)
            # A segment starts from the current mean: z_0 = mu_0 (+ noise).
            s.x[:Bk].copy_(s.feed(s.mu[:Bk], eps[:, 0]) if noisy else s.mu[:Bk])
            for t in range(k):
                self.step.latent_step(t, rule, lat, hid, eps if noisy else None)

        with self._inference():
            self._graphs.run(("latent", Bk, k, rule.graph_key, noisy, s.group, s.prompts), segment)
        s.host_len += k
        return LatentSegment(lat[:B].clone(), hid[:B].clone(), s.num_latent[:B].clone())

    def _decode(self, p: TextParams, generator: torch.Generator | None) -> TextOutput:
        """Like gpt-fast's decode_n_tokens: sample, record, feed, until max_new_tokens or
        every sample has stopped."""
        s, T = self.state, p.max_new_tokens
        B, Bk = s.batch, s.bucket
        s.start_text(p.stop_ids, pad_id=p.pad_id, temperature=p.temperature if not p.greedy else 1.0, top_p=p.top_p,
                     repetition_penalty=p.repetition_penalty)
        tokens = torch.full((B, T), p.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(B, T, dtype=torch.float32, device=self.device)
        logits = (torch.zeros(B, T, self.adapter.vocab_size, dtype=torch.float32, device=self.device)
                  if p.return_logits else None)
        key = ("text", Bk, p.greedy, p.use_top_p, p.use_penalty, s.group, s.prompts)
        start, base = 0, s.host_len
        with self._inference():
            if p.first_token is None and T > 0:  # the first token comes from the current hidden state
                s.logits[:Bk].copy_(self.adapter.lm_head(s.h[:Bk]))
                self._draw(p, generator)
                self.step.sample(p)
                s.record(0, tokens, logprobs, logits)
                start = 1
            elif p.first_token is not None and p.first_token != FROM_SEGMENT:
                s.tok[:B] = p.first_token
            for t in range(start, T):
                if t == 1 and not p.stop_first:
                    s.active[:B] = True  # the first token does not stop a row (a fill, no sync)
                if self._all_stopped(t, start):
                    break
                self._draw(p, generator)
                bound = base + (t - start) + 1
                self._graphs.run(key, lambda: (self.step.feed_tokens(bound), self.step.sample(p)))
                s.record(t, tokens, logprobs, logits)
        s.host_len = base + p.feeds
        text_lengths = s.text_len[:B].clone()
        if logits is not None:
            logits *= (torch.arange(T, device=self.device)[None, :] < text_lengths[:, None])[..., None]
        return TextOutput(tokens=tokens, token_logprobs=logprobs, text_lengths=text_lengths, logits=logits)

    def _all_stopped(self, t: int, start: int) -> bool:
        """Every sample stopped (a host sync: on CUDA checked once per _STOP_POLL steps)."""
        if t == 0 or (self.device.type != "cpu" and (t - start) % _STOP_POLL != 0):
            return False
        return not bool(self.state.active[:self.state.batch].any())

    def _draw(self, p: TextParams, generator: torch.Generator | None) -> None:
        if not p.greedy:  # outside any graph: the next sampling step uses these draws
            self.state.draw_noise(generator)

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

    def _latent_size(self) -> int | None:
        """Size of the fed latent: D without a projector; a projector's output size is
        known only when it is an nn.Linear."""
        if self.projector is None:
            return self.adapter.hidden_size
        return getattr(self.projector, "out_features", None)

    def _require_prefill(self) -> None:
        if self.state.batch == 0:
            raise RuntimeError("call prefill(batch) (or generate) before latent_segment / decode_text")
