"""The strongest plain-HF peers of the latent engine, for benchmarks/bench_latent_step.py.

- ``static_step``: one latent step (the post-norm hidden fed back as ``inputs_embeds``)
  over an HF StaticCache already holding L positions, optionally with the decoder under
  ``torch.compile`` (the gpt-fast recipe: mode "max-autotune-no-cudagraphs", then the
  step captured in a CUDA graph by hand, so the graph holds the compiled kernels) and
  optionally captured in a CUDA graph.
- ``StaticGenerate``: the whole generate of medlvr/engine/hf_loop.py (prefill, K
  latent steps, ``first_token``, T greedy answer tokens) over one StaticCache set up once,
  each decode step replayed from a CUDA graph: a latent graph (embeds -> post-norm hidden,
  written back as the next embeds) and a text graph (token -> embed -> decoder -> lm_head
  -> argmax -> token). The prompt is prefilled eagerly, as HF generate does.

Every transformers call goes through medlvr/models/hf.py. Without CUDA the same loops run
eagerly (no graph), which is what the CPU --quick run exercises; tests/test_bench_hf_peers.py
checks on CPU that they compute the latent loop of medlvr/engine/hf_loop.py.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from medlvr.engine.graphs import capture_graph
from medlvr.models import hf

GPT_FAST_MODE = "max-autotune-no-cudagraphs"


def capture(fn: Callable[[], None], warmups: Callable[[], None]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph; returns its replay. ``warmups`` runs on a side
    stream first (lazy allocations, cuBLAS handles, compiled-kernel autotuning)."""
    return capture_graph(fn, warmup=warmups)[0].replay


def _decoder_fn(model, compile_mode: str | None):
    """(embeds, pos, cache, cpos) -> post-norm hidden: the HF decoder, compiled or not."""
    lm = hf.decoder(model)
    if compile_mode:
        torch.compiler.reset()  # a fresh compile per shape: no recompile limit across benchmark cases
    run = torch.compile(lm, mode=compile_mode, dynamic=False) if compile_mode else lm

    def call(embeds, pos, cache, cpos):
        return run(**hf.decoder_kwargs(model, embeds, None, pos, cache, cache_position=cpos)).last_hidden_state
    return call


def _positions(model, B: int, n: int, start: int, device) -> torch.Tensor:
    pos = torch.arange(start, start + n, device=device)
    return pos.view(1, 1, n).expand(3, B, n).clone() if hf.is_multimodal(model) else pos.expand(B, n).clone()


def static_step(model, B: int, L: int, device, dtype, *, compile_mode: str | None = None,
                graph: bool = True) -> tuple[Callable[[], None], Callable[[], None], torch.Tensor]:
    """(step, reset, h): one latent step over a StaticCache filled with L random
    positions, h (B, 1, D) its input, overwritten by its output; reset() rewinds the
    cache write position to L (the cache contents do not change the work, only how much
    is read)."""
    D = hf.decoder(model).config.hidden_size
    cache = hf.new_static_cache(model, L + 64)
    decode = _decoder_fn(model, compile_mode)
    with torch.no_grad():  # fill [0, L) through the model itself (lazy cache init), in chunks
        for s in range(0, L, 512):
            n = min(512, L - s)
            hf.run_decoder(model, torch.randn(B, n, D, device=device, dtype=dtype) * 0.02, None,
                           _positions(model, B, n, s, device), cache,
                           cache_position=torch.arange(s, s + n, device=device))
    h = torch.randn(B, 1, D, device=device, dtype=dtype)
    pos = _positions(model, B, 1, L, device)
    cpos = torch.full((1,), L, device=device, dtype=torch.long)

    def reset():
        pos.fill_(L)
        cpos.fill_(L)
        hf.rewind_static_cache(cache, L)

    def forward():
        h.copy_(decode(h, pos, cache, cpos)[:, -1:])
        pos.add_(1)
        cpos.add_(1)

    def warm():
        for _ in range(3):  # compiled code: the first calls compile/autotune
            reset()
            forward()

    with torch.no_grad():
        if not graph:
            warm()
            return forward, reset, h
        replay = capture(forward, warm)
    return replay, reset, h


class StaticGenerate:
    """The latent loop (greedy, fixed K, no stop ids) over an HF StaticCache, decode steps
    replayed from CUDA graphs (``graph=False``: run eagerly, e.g. on CPU).

    Step for step the sequence of medlvr.engine.hf_loop.latent_loop(model, batch,
    k=k, max_new_tokens=T, first_token=first_token): prefill -> h; k times h = dec(h);
    then T times tok = argmax(lm_head(dec(embed(tok)))) starting from first_token.
    batch: unpadded prompts (attention_mask all ones: with no padding the StaticCache's
    causal mask is the whole mask). Calling it returns tokens (B, T); ``hidden`` then
    holds the last latent step's output (B, 1, D)."""

    def __init__(self, model, batch: Mapping[str, Any], *, k: int, max_new_tokens: int, first_token: int,
                 graph: bool = True, compile_mode: str | None = None):
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("batch['attention_mask'] must be all ones (StaticGenerate takes unpadded prompts)")
        self.model = hf.unwrap(model)
        p = hf.prompt_inputs(self.model, batch)
        self.embeds, self.prompt_pos = p["embeds"], p["position_ids"]
        B, P, D = self.embeds.shape
        dev = self.embeds.device
        self.k, self.T, self.P, self.first_token = k, max_new_tokens, P, first_token
        self.cache = hf.new_static_cache(self.model, P + k + max_new_tokens + 1)
        self.decode = _decoder_fn(self.model, compile_mode)
        self.embed, self.head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        self.hidden = torch.zeros(B, 1, D, device=dev, dtype=self.embeds.dtype)
        self.tok = torch.zeros(B, 1, device=dev, dtype=torch.long)
        self.pos = self.prompt_pos[..., -1:].clone()
        self.cpos = torch.zeros(1, device=dev, dtype=torch.long)
        self.tokens = torch.zeros(B, max_new_tokens, device=dev, dtype=torch.long)
        self.latent, self.text = self._latent, self._text
        if graph:
            with torch.no_grad():
                self._prefill()  # allocates the cache before capture
                self.latent = capture(self._latent, lambda: [self._latent() for _ in range(3)])
                self.text = capture(self._text, lambda: [self._text() for _ in range(3)])

    def _prefill(self) -> None:
        self.cache.reset()
        h = hf.run_decoder(self.model, self.embeds, None, self.prompt_pos, self.cache,
                           cache_position=torch.arange(self.P, device=self.embeds.device))
        self.hidden.copy_(h[:, -1:])
        self.pos.copy_(self.prompt_pos[..., -1:] + 1)
        self.cpos.fill_(self.P)

    def _advance(self) -> None:
        self.pos.add_(1)
        self.cpos.add_(1)

    def _latent(self) -> None:
        self.hidden.copy_(self.decode(self.hidden, self.pos, self.cache, self.cpos)[:, -1:])
        self._advance()

    def _text(self) -> None:
        out = self.decode(self.embed(self.tok), self.pos, self.cache, self.cpos)
        self.tok.copy_(self.head(out[:, -1]).argmax(-1, keepdim=True))
        self._advance()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        self._prefill()
        for _ in range(self.k):
            self.latent()
        self.tok.fill_(self.first_token)
        for j in range(self.T):
            self.text()
            self.tokens[:, j] = self.tok[:, 0]
        return self.tokens
