"""One call on the user's own model: ``generate``, ``patch`` and ``custom_generate``.

    out = medlvr.generate(model, processor(...), spec="coconut", tokenizer=tok)
    out.tokens, out.latents, out.num_latent

The prompt (what the tokenizer / processor returns, left- or right-padded) is cut at the
spec's start token and re-padded on the left as the engine wants it (docs/engine.md);
Coconut's placeholders are counted per row (the token-count exit) and dropped, since the
engine feeds the latents in their place. Every check runs before the engine does.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medlvr.dropin import decoding as hf_decoding
from medlvr.dropin.spec import LatentSpec, ResolvedTokens
from medlvr.engine import adapter_for, holder_for
from medlvr.engine.request import check_repetition_penalty
from medlvr.models import hf


@dataclass
class DropinOutput:
    """tokens (B, T) answer ids (pad after the stop), token_logprobs (B, T), text_lengths
    (B); latents (B, K, D) the latents fed (zero after each row's exit), num_latent (B);
    prompt_ids (B, S) the left-padded prompts the engine ran (cut after the start token),
    prompt_mask (B, S); sequences (B, S_in + T): the caller's input_ids followed by the
    answer, HF generate's layout (the latents are not ids: they are in ``latents``);
    latent_capped (B) bool: the rows whose segment ran its whole step budget (spec.max_steps,
    or spec.step_limit for a spec without a cap of its own), so that the budget and not the
    exit rule may have ended it (a row whose test fired at exactly that step counts too);
    False for "fixed" and "count", which run their steps by rule."""

    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    text_lengths: torch.Tensor
    latents: torch.Tensor
    num_latent: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    sequences: torch.Tensor
    latent_capped: torch.Tensor | None = None
    decoding: dict | None = None  # the settings it decoded with (``decoding_settings``)


def _spec(spec) -> LatentSpec:
    if isinstance(spec, str):
        return LatentSpec.preset(spec)
    if not isinstance(spec, LatentSpec):
        raise TypeError(f"spec must be a LatentSpec or a preset name, got {type(spec).__name__}")
    return spec


def _rows(inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("inputs must hold input_ids, a (B, S) tensor (what the tokenizer / processor returns)")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise ValueError(f"inputs['attention_mask'] must have input_ids' shape {tuple(ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    return [ids[b][mask[b].bool()] for b in range(ids.shape[0])]


def engine_prompts(inputs: Mapping[str, Any], spec: LatentSpec, tok: ResolvedTokens, *, pad_id: int = 0):
    """(batch for the engine, latent_counts or None). Each row is cut right after its
    last start token (right before it when the spec's start token is not embedded); what follows must be nothing ("after_start") or placeholders,
    optionally closed by the end token ("placeholders")."""
    rows, counts = [], []
    for b, row in enumerate(_rows(inputs)):
        hits = (row == tok.start).nonzero().flatten().tolist()
        if not hits:
            if spec.require_start:
                raise ValueError(f"inputs['input_ids'] row {b} holds no latent start token (id {tok.start}, "
                                 f"{spec.start_token!r}) but spec {spec.name!r} requires one")
            row = torch.cat([row, row.new_tensor([tok.start])])
            hits = [row.numel() - 1]
        tail = row[hits[-1] + 1:].tolist()
        # start_embedded=False (Monet): <start>'s position takes the first latent, so the
        # prompt the engine runs stops before it.
        cut = hits[-1] + (1 if spec.start_embedded else 0)
        if spec.placement == "placeholders":
            if tail and tail[-1] == tok.end:
                tail = tail[:-1]
            if any(t != tok.latent for t in tail):
                raise ValueError(f"inputs['input_ids'] row {b}: after the start token only latent placeholders "
                                 f"(id {tok.latent}) and the end token may follow, got {tail}")
            counts.append(len(tail))
        elif tail:
            raise ValueError(f"inputs['input_ids'] row {b}: the prompt must end with the start token "
                             f"(id {tok.start}); {len(tail)} tokens follow it")
        rows.append(row[:cut])
    S = max(r.numel() for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, S - r.numel():] = r
        mask[b, S - r.numel():] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in ("pixel_values", "image_grid_thw"):  # images precede the start token: kept as they are
        if inputs.get(key) is not None:
            batch[key] = inputs[key]
    return batch, (counts if spec.placement == "placeholders" else None)


def _stop_ids(model, tokenizer, stop_ids):
    if stop_ids is not None:
        return list(stop_ids)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def generate(model: nn.Module, inputs: Mapping[str, Any], spec: LatentSpec | str = "medlvr", *, tokenizer=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Sequence[int] | None = None, generator: torch.Generator | None = None,
             repetition_penalty: float = 1.0, pad_id: int | None = None) -> DropinOutput:
    """Run ``spec``'s latent reasoning on ``model`` with the engine: prompt -> latents ->
    end token -> answer. ``inputs``: the tokenizer's / processor's output (input_ids,
    attention_mask, and pixel_values / image_grid_thw for VLMs). ``tokenizer`` resolves
    token names and gives the eos id (stop_ids default). repetition_penalty: HF's, over the
    ids of the prompt the engine runs and every token fed after it (docs/dropin.md). pad_id:
    the id after a row's stop (default: the first stop id). The engine is built on first use
    and kept per model (medlvr.engine.holder_for; medlvr.engine.holder.release frees it).
    ``out.decoding`` holds the settings it decoded with."""
    spec = _spec(spec)
    check_repetition_penalty(repetition_penalty)
    model = hf.unwrap(model)
    adapter = adapter_for(model)  # unsupported model types fail here, listing the supported ones
    tok = spec.resolve(tokenizer, vocab_size=adapter.vocab_size)
    stops = _stop_ids(model, tokenizer, stop_ids)
    pad = pad_id if pad_id is not None else (stops[0] if stops else 0)
    batch, counts = engine_prompts(inputs, spec, tok, pad_id=pad)
    if spec.max_steps is not None:
        k = spec.max_steps
    else:  # "count": the batch's largest count; else the safety cap, never the text budget
        k = max(counts) if counts is not None else spec.step_limit
    if counts is not None and spec.max_steps is not None and max(counts) > spec.max_steps:
        raise ValueError(f"a prompt holds {max(counts)} latent placeholders, more than spec.max_steps "
                         f"{spec.max_steps}")
    end_emb = spec.end_embedding
    if isinstance(end_emb, str):
        if not isinstance(getattr(model, end_emb, None), torch.Tensor):
            raise ValueError(f"spec {spec.name!r}: end_embedding names model.{end_emb}, which is not a tensor")
        end_emb = getattr(model, end_emb)
    projector = spec.projector if spec.projector is not None else getattr(model, "latent_projector", None)
    holder = holder_for(model, projector=projector, project_first=spec.project_first,
                        projector_logits=spec.projector_logits)
    out = holder.generate(batch, k_max=k, exit=spec.exit, exit_threshold=spec.exit_threshold,
                       exit_scope=spec.exit_scope, exit_distance=spec.exit_distance,
                       exit_distance_on=spec.exit_distance_on, exit_check_start=spec.exit_check_start,
                       after_exit=spec.after_exit, latent_pad_id=tok.latent_pad, end_embedding=end_emb,
                       latent_counts=counts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       repetition_penalty=repetition_penalty,
                       stop_ids=stops, stop_first=spec.stop_first, latent_end_id=tok.end, generator=generator,
                       pad_id=pad)
    ids = inputs["input_ids"].to(out.tokens.device)
    decoding = dict(greedy=temperature == 0, temperature=float(temperature), top_p=float(top_p) if temperature else 1.0,
                    repetition_penalty=float(repetition_penalty), max_new_tokens=max_new_tokens, stop_ids=list(stops),
                    pad_id=pad, notes=[])
    return DropinOutput(decoding=decoding,
                        tokens=out.tokens, token_logprobs=out.token_logprobs, text_lengths=out.text_lengths,
                        latents=out.latents, num_latent=out.num_latent, prompt_ids=batch["input_ids"],
                        prompt_mask=batch["attention_mask"], sequences=torch.cat([ids, out.tokens], dim=1),
                        latent_capped=_capped(spec, k, out.num_latent))


def _capped(spec: LatentSpec, k: int, num_latent: torch.Tensor) -> torch.Tensor:
    """DropinOutput.latent_capped; warns when the cap hit is medlvr's step_limit, not the
    system's own (the original would have stayed in latent mode: its latents differ)."""
    if spec.exit in ("fixed", "count") or k == 0:
        return torch.zeros_like(num_latent, dtype=torch.bool)
    capped = num_latent >= k
    if spec.max_steps is None:
        rows = capped.nonzero().flatten().tolist()  # one read, after the answer is decoded
        if rows:
            warnings.warn(f"medlvr.generate: spec {spec.name!r}: rows {rows} ran step_limit={k} latent steps, "
                          f"medlvr's safety cap (the spec has no step cap of its own, max_steps=None: the "
                          f"original would have stayed in latent mode until its exit fired, unless it fired at "
                          f"that step); raise it with spec.replace(step_limit=...)", RuntimeWarning, stacklevel=3)
    return capped


def _holds_start(input_ids, tok: ResolvedTokens) -> bool:
    return isinstance(input_ids, torch.Tensor) and bool((input_ids == tok.start).any())


def patch(model: nn.Module, spec: LatentSpec | str, *, tokenizer=None) -> nn.Module:
    """Make ``model.generate(...)`` run prompts that hold the spec's start token through the
    engine (returning HF's layout: input_ids + answer, or a DropinOutput with
    ``return_dict_in_generate=True``); every other call goes to HF's generate untouched.
    On the engine route the call's settings, its ``generation_config`` and the model's
    ``generation_config`` are read with HF's priority (medlvr/dropin/decoding.py): do_sample,
    temperature, top_p, repetition_penalty, max_new_tokens / max_length, eos_token_id,
    pad_token_id and a non-filtering top_k (or top_k=1: greedy) are honoured; a setting that
    changes the tokens otherwise raises ValueError naming it; ``generator`` is medlvr's.
    Returns the model."""
    spec = _spec(spec)
    adapter = adapter_for(hf.unwrap(model))
    tok = spec.resolve(tokenizer, vocab_size=adapter.vocab_size)
    original = model.generate

    @functools.wraps(original)
    def routed(*args, **kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if not _holds_start(inputs, tok):
            return original(*args, **kwargs)
        return _run_hf_style(model, spec, tokenizer, inputs, kwargs)

    model.generate = routed
    model.medlvr_unpatched_generate = original
    return model


_HF_KEYS = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "generator",
            "generation_config", "logits_processor", "stopping_criteria", "token_type_ids",
            *hf_decoding.KNOWN_SETTINGS}


def _hf_settings(model, kwargs, input_ids, *, resolved: bool = False) -> hf_decoding.Decoding:
    unknown = sorted(set(kwargs) - _HF_KEYS)
    if unknown:
        raise ValueError(f"generate arguments {unknown} are not supported on medlvr's latent route")
    model = hf.unwrap(model)
    width = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else None
    return hf_decoding.from_hf(kwargs, model_config=getattr(model, "generation_config", None),
                               vocab=adapter_for(model).vocab_size, width=width, resolved=resolved)


def decoding_settings(model: nn.Module, **generate_kwargs) -> dict:
    """The settings a ``patch``'d ``model.generate(**generate_kwargs)`` on the latent route decodes
    with, resolved from the call, its ``generation_config`` and the model's as HF would
    (docs/dropin.md), without running anything: greedy, temperature (0: greedy), top_p,
    repetition_penalty, max_new_tokens, stop_ids, pad_id, notes (settings mapped or ignored).
    Raises the ValueError that call would raise for a setting medlvr does not implement."""
    d = _hf_settings(model, generate_kwargs, generate_kwargs.get("input_ids"))
    return dict(greedy=d.greedy, temperature=d.temperature, top_p=float(d.top_p) if not d.greedy else 1.0,
                repetition_penalty=d.repetition_penalty, max_new_tokens=d.max_new_tokens, stop_ids=list(d.stop_ids),
                pad_id=d.pad_id if d.pad_id is not None else (d.stop_ids[0] if d.stop_ids else 0),
                notes=list(d.notes))


def _run_hf_style(model, spec, tokenizer, input_ids, kwargs, resolved: bool = False) -> DropinOutput | torch.Tensor:
    d = _hf_settings(model, kwargs, input_ids, resolved=resolved)
    out = generate(model, {**kwargs, "input_ids": input_ids}, spec, tokenizer=tokenizer,
                   max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                   repetition_penalty=d.repetition_penalty, stop_ids=d.stop_ids, pad_id=d.pad_id,
                   generator=kwargs.get("generator"))
    out.decoding["notes"] = list(d.notes)
    return out if kwargs.get("return_dict_in_generate") else out.sequences


def custom_generate(spec: LatentSpec | str, *, tokenizer=None):
    """A decoding callable for ``model.generate(inputs, custom_generate=...)`` (transformers
    >= 5 calls it after its own input preparation with the prepared input_ids and model
    kwargs). The settings are read from HF's merged ``generation_config`` as ``patch`` reads them;
    HF's prepared logits processors and stopping criteria may only be those those settings make
    (repetition penalty, temperature, top-p, top-k; max length, eos): any other raises."""
    spec = _spec(spec)

    def decode(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
               synced_gpus=False, streamer=None, **model_kwargs):
        kw = {k: v for k, v in model_kwargs.items() if k in ("attention_mask", "pixel_values", "image_grid_thw")}
        kw.update(generation_config=generation_config, logits_processor=logits_processor,
                  stopping_criteria=stopping_criteria, streamer=streamer)
        if generation_config is not None:
            kw["return_dict_in_generate"] = bool(getattr(generation_config, "return_dict_in_generate", False))
        return _run_hf_style(model, spec, tokenizer, input_ids, kw, resolved=generation_config is not None)

    return decode
